//! `tandem bench relay`: what it costs to relay token streams, Tandem against nginx and against
//! calling the engines directly, side by side in one run.
//!
//! Every party is its own process so its CPU, write calls and memory can be read from `/proc`:
//! the simulated engines (`tandem sim`), Tandem (`tandem serve`, disaggregation off: a plain
//! proxy), nginx (when installed, configured as the guides configure it for vLLM: `least_conn`,
//! `keepalive 32`, `proxy_buffering off`, HTTP/1.1 upstream), and this process, the load
//! generator. Four phases:
//! 1. throughput: closed-loop streams against fast engines, each target in turn (the order
//!    alternating between rounds), counting tokens received, the proxy's CPU seconds and write
//!    calls (`syscw`) in the same window;
//! 2. memory: slow streams held open, RSS of the proxy at each step;
//! 3. bursts: repeated bursts of held streams, RSS before, at the peak and a settle time after;
//! 4. added TTFT: closed-loop streams split between direct, nginx and Tandem over one engine at
//!    the same time, so their differences are what each proxy adds, not run-to-run noise.
//!
//! Not part of `cargo test`: it takes minutes and its figures depend on the machine.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::bench::{one, Run};

type BoxError = Box<dyn std::error::Error>;

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Concurrent streams in the throughput phase.
    #[arg(long, default_value_t = 512)]
    streams: usize,
    /// Fast engines behind each proxy in the throughput phase.
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// Measured seconds per target and round in the throughput phase (after one warm-up second).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Throughput rounds; each measures every target once, in alternating order.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Output tokens per request in the throughput phase.
    #[arg(long, default_value_t = 256)]
    max_tokens: u64,
    /// The fast engines' simulated seconds per real second.
    #[arg(long, default_value_t = 50.0)]
    fast_time_scale: f64,
    /// Streams held open in the memory phase, in increasing steps (empty: skip the phase).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    hold: Vec<usize>,
    /// Bursts of held streams in the burst phase (0: skip it).
    #[arg(long, default_value_t = 5)]
    bursts: usize,
    /// Streams per burst.
    #[arg(long, default_value_t = 3000)]
    burst_streams: usize,
    /// Run the bursts against nginx too (they take `bursts` x `settle_secs` per target).
    #[arg(long)]
    nginx_bursts: bool,
    /// Seconds after a burst (and after the memory phase) before RSS is read again.
    #[arg(long, default_value_t = 60.0)]
    settle_secs: f64,
    /// Streams in the added-TTFT phase, split between direct, nginx and Tandem (0: skip it).
    #[arg(long, default_value_t = 200)]
    ttft_streams: usize,
    /// Requests per stream in the added-TTFT phase.
    #[arg(long, default_value_t = 10)]
    ttft_requests: usize,
    /// The nginx binary (default: `nginx` on PATH; the nginx target is left out without one).
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Leave nginx out even when it is installed.
    #[arg(long)]
    no_nginx: bool,
    /// The phases to run: throughput, memory, bursts, ttft.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,memory,bursts,ttft"
    )]
    phases: Vec<String>,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl RelayArgs {
    fn phase(&self, name: &str) -> bool {
        self.phases.iter().any(|p| p == name)
    }
}

/// A child process announced by a JSON ready line (`tandem sim`, `tandem serve`).
struct Proc {
    child: Child,
    url: String,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

async fn spawn_ready(mut cmd: Command) -> Result<Proc, BoxError> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .env("RUST_LOG", "error");
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| "no ready line within 60 s")??
        .ok_or("exited before its ready line")?;
    let ready: serde_json::Value = serde_json::from_str(&line)?;
    let url = ready["http"].as_str().ok_or("no http address")?.to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc { child, url })
}

async fn sim(args: &[&str]) -> Result<Proc, BoxError> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["sim", "--port", "0"]).args(args);
    spawn_ready(cmd).await
}

/// `n` qwen3-0.6b engines with these flags.
async fn sims(n: usize, args: &[&str]) -> Result<Vec<Proc>, BoxError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut all = vec!["--model", "qwen3-0.6b"];
        all.extend_from_slice(args);
        out.push(sim(&all).await?);
    }
    Ok(out)
}

async fn tandem(engines: &[&Proc], dir: &std::path::Path) -> Result<Proc, BoxError> {
    let list: Vec<String> = engines.iter().map(|e| format!("\"{}\"", e.url)).collect();
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 30000\n\n\
         [pools.prefill]\nendpoints = []\n\n\
         [pools.decode]\nendpoints = [{}]\n\n\
         [disaggregation]\nmode = \"never\"\n\n\
         [admission]\nmax_queued = 30000\n",
        list.join(", ")
    );
    let path = dir.join(format!("tandem-{}.toml", engines[0].pid()));
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("serve").arg("--config").arg(&path);
    spawn_ready(cmd).await
}

/// nginx in the foreground with its own prefix directory, on a port found free just before.
async fn nginx(
    bin: &std::path::Path,
    engines: &[&Proc],
    dir: &std::path::Path,
) -> Result<Proc, BoxError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let prefix = dir.join(format!("nginx-{port}"));
    std::fs::create_dir_all(prefix.join("logs"))?;
    let servers: String = engines
        .iter()
        .map(|e| format!("    server {};\n", e.url.trim_start_matches("http://")))
        .collect();
    let conf = format!(
        "worker_processes auto;\nworker_rlimit_nofile 65535;\ndaemon off;\npid {p}/nginx.pid;\n\
         error_log {p}/logs/error.log warn;\nevents {{ worker_connections 30000; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
         \n  upstream engines {{\n    least_conn;\n{servers}    keepalive 32;\n  }}\n\
         \n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://engines;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
               proxy_read_timeout 3600s;\n    }}\n  }}\n}}\n",
        p = prefix.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("logs/error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let child = cmd.spawn()?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(Proc {
                child,
                url: format!("http://127.0.0.1:{port}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err("nginx did not listen within 5 s".into())
}

fn nginx_bin(a: &RelayArgs) -> Option<PathBuf> {
    if a.no_nginx {
        return None;
    }
    if let Some(p) = &a.nginx {
        return Some(p.clone());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// CPU seconds, write calls and resident memory of a process and its descendants (nginx's
/// workers), from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_s: f64,
    writes: u64,
    rss_kib: u64,
}

fn usage(root: u32) -> Usage {
    if root == 0 {
        // No proxy (direct); and every process descends from pid 0.
        return Usage::default();
    }
    let mut pids = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        let all: Vec<(u32, u32)> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| Some((pid, stat(pid)?.0)))
            .collect();
        // Children of the root and theirs (nginx: master → workers).
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            pids.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
            i += 1;
        }
    }
    let mut u = Usage::default();
    for pid in pids {
        if let Some((_, ticks)) = stat(pid) {
            // USER_HZ is 100 on every Linux this runs on.
            u.cpu_s += ticks as f64 / 100.0;
        }
        u.writes += proc_field(pid, "io", "syscw:");
        u.rss_kib += proc_field(pid, "status", "VmRSS:");
    }
    u
}

/// `(ppid, utime + stime)` from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Counts completion chunks with text in a stream's bytes, across chunk boundaries.
#[derive(Default)]
struct TokenCounter {
    tail: Vec<u8>,
}

const TEXT_KEY: &[u8] = b"\"text\":\"";

impl TokenCounter {
    fn count(&mut self, chunk: &[u8]) -> u64 {
        // Only the bytes that could complete a key split across the boundary are carried.
        let joined;
        let data: &[u8] = if self.tail.is_empty() {
            chunk
        } else {
            joined = [std::mem::take(&mut self.tail).as_slice(), chunk].concat();
            &joined
        };
        let mut n = 0;
        for i in memchr::memmem::find_iter(data, TEXT_KEY) {
            match data.get(i + TEXT_KEY.len()) {
                Some(b'"') => {}
                Some(_) => n += 1,
                // The key ends the chunk: judged with the next one.
                None => {}
            }
        }
        // A key that ends the data is carried whole; one counted here cannot fit in the tail.
        let keep = TEXT_KEY.len().min(data.len());
        self.tail = data[data.len() - keep..].to_vec();
        n
    }
}

fn client(streams: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(streams)
        .http1_only()
        .timeout(Duration::from_secs(3600))
        .build()
        .expect("a default client builds")
}

/// One target's throughput window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    tokens: u64,
    secs: f64,
    proxy: Usage,
    client_cpu_s: f64,
    errors: u64,
}

impl Window {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.secs
    }
    fn per_million(&self, v: f64) -> f64 {
        v / self.tokens.max(1) as f64 * 1e6
    }
}

/// Closed-loop streams against `base` for a warm-up second and then `secs`; the proxy's usage
/// over the measured window (`pid` 0: none, direct).
async fn throughput(base: &str, pid: u32, streams: usize, a: &RelayArgs) -> Window {
    let client = client(streams);
    let tokens = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let body = Arc::new(
        json!({"prompt": "relay benchmark prompt", "max_tokens": a.max_tokens,
            "ignore_eos": true, "stream": true})
        .to_string(),
    );
    let url = format!("{base}/v1/completions");
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (client, body, url, tokens, errors) = (
                client.clone(),
                body.clone(),
                url.clone(),
                tokens.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let resp = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.as_str().to_owned())
                        .send()
                        .await;
                    let Ok(resp) = resp.and_then(|r| r.error_for_status()) else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let mut s = resp.bytes_stream();
                    let mut counter = TokenCounter::default();
                    while let Some(chunk) = s.next().await {
                        match chunk {
                            Ok(c) => {
                                tokens.fetch_add(counter.count(&c), Ordering::Relaxed);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, u0, c0, e0) = (
        tokens.load(Ordering::Relaxed),
        usage(pid),
        own_cpu(),
        errors.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    let (t1, u1, c1, e1) = (
        tokens.load(Ordering::Relaxed),
        usage(pid),
        own_cpu(),
        errors.load(Ordering::Relaxed),
    );
    let secs = start.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    Window {
        tokens: t1 - t0,
        secs,
        proxy: Usage {
            cpu_s: u1.cpu_s - u0.cpu_s,
            writes: u1.writes - u0.writes,
            rss_kib: u1.rss_kib,
        },
        client_cpu_s: c1 - c0,
        errors: e1 - e0,
    }
}

fn own_cpu() -> f64 {
    stat(std::process::id()).map_or(0.0, |(_, t)| t as f64 / 100.0)
}

/// Streams held open: each reads its stream to the end, and counts itself once its first bytes
/// arrived.
struct Held {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Held {
    fn new() -> Held {
        Held {
            tasks: Vec::new(),
            started: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn open(&mut self, client: &reqwest::Client, base: &str, n: usize) {
        let url = format!("{base}/v1/completions");
        for _ in 0..n {
            let (client, url, started, failed) = (
                client.clone(),
                url.clone(),
                self.started.clone(),
                self.failed.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                let body = json!({"prompt": "hold", "max_tokens": 4000, "ignore_eos": true,
                    "stream": true});
                let Ok(resp) = client.post(&url).json(&body).send().await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut s = resp.bytes_stream();
                let mut first = true;
                while let Some(Ok(_)) = s.next().await {
                    if first {
                        started.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                }
            }));
        }
    }

    /// Wait until `n` streams have their first bytes (or failed), at most `limit`.
    async fn until(&self, n: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            let (s, f) = (
                self.started.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed),
            );
            if s + f >= n || Instant::now() > end {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn close(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// RSS of the proxy while `steps` streams are held, and after they close and `settle` passes.
async fn memory(base: &str, pid: u32, steps: &[usize], settle: Duration) -> serde_json::Value {
    let before = usage(pid).rss_kib;
    let client = client(steps.iter().copied().max().unwrap_or(1));
    let mut held = Held::new();
    let mut rows = Vec::new();
    for &n in steps {
        let have = held.tasks.len();
        held.open(&client, base, n.saturating_sub(have));
        let started = held.until(n, Duration::from_secs(120)).await;
        // Let the streams settle into their steady state before reading.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = usage(pid).rss_kib;
        let per_stream = (rss.saturating_sub(before)) as f64 / started.max(1) as f64;
        println!(
            "    {n:>6} streams held ({started} streaming): RSS {:>7.1} MiB, {per_stream:>5.1} KiB per stream over the {:.1} MiB before",
            mib(rss),
            mib(before)
        );
        rows.push(
            json!({"streams": n, "streaming": started, "rss_mib": mib(rss),
            "kib_per_stream": per_stream}),
        );
    }
    held.close();
    drop(client);
    tokio::time::sleep(settle).await;
    let after = usage(pid).rss_kib;
    println!(
        "    {:.0} s after they closed: RSS {:.1} MiB",
        settle.as_secs_f64(),
        mib(after)
    );
    json!({"before_mib": mib(before), "held": rows, "after_mib": mib(after)})
}

async fn bursts(base: &str, pid: u32, a: &RelayArgs) -> serde_json::Value {
    let settle = Duration::from_secs_f64(a.settle_secs);
    let before = usage(pid).rss_kib;
    let mut rows = Vec::new();
    for i in 0..a.bursts {
        let client = client(a.burst_streams);
        let mut held = Held::new();
        held.open(&client, base, a.burst_streams);
        let started = held.until(a.burst_streams, Duration::from_secs(120)).await;
        let peak = usage(pid).rss_kib;
        held.close();
        drop(client);
        tokio::time::sleep(settle).await;
        let after = usage(pid).rss_kib;
        println!(
            "    burst {}: {started} streams, RSS peak {:.1} MiB, {:.0} s later {:.1} MiB ({:+.0} % of the {:.1} MiB before the first)",
            i + 1,
            mib(peak),
            settle.as_secs_f64(),
            mib(after),
            (after as f64 / before.max(1) as f64 - 1.0) * 100.0,
            mib(before)
        );
        rows.push(json!({"streams": started, "peak_mib": mib(peak), "after_mib": mib(after)}));
    }
    json!({"before_mib": mib(before), "bursts": rows})
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, crate::harness::pct(v, 0.99).unwrap_or(f64::NAN))
}

pub async fn run(a: RelayArgs) -> Result<(), BoxError> {
    let most = a
        .hold
        .iter()
        .copied()
        .chain([a.burst_streams])
        .max()
        .unwrap_or(0) as u64;
    if let Some(limit) = fd_limit().filter(|&l| l < 2 * most + 256) {
        eprintln!(
            "warning: the open-file limit is {limit}; holding {most} streams needs about {} in the proxy (raise `ulimit -n`)",
            2 * most + 256
        );
    }
    let dir = std::env::temp_dir().join(format!("tandem-bench-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let nginx_bin = nginx_bin(&a);
    println!(
        "tandem bench relay (pid {}): {} streams over {} fast engines (qwen3-0.6b x{}), {} s per target and round, {} rounds; nginx: {}",
        std::process::id(),
        a.streams,
        a.engines,
        a.fast_time_scale,
        a.seconds,
        a.rounds,
        nginx_bin
            .as_ref()
            .map_or("not installed".into(), |p| p.display().to_string())
    );
    let mut out = serde_json::Map::new();

    // 1. Throughput.
    if a.phase("throughput") {
        let ts = a.fast_time_scale.to_string();
        let fast = sims(a.engines, &["--time-scale", &ts, "--max-num-seqs", "1024"]).await?;
        let fast_refs: Vec<&Proc> = fast.iter().collect();
        let t = tandem(&fast_refs, &dir).await?;
        eprintln!("  (tandem at {}, pid {})", t.url, t.pid());
        let n = match &nginx_bin {
            Some(b) => Some(nginx(b, &fast_refs, &dir).await?),
            None => None,
        };
        // Direct: the streams split over the engines as the proxies' balancing would.
        let mut targets: Vec<(&str, String, u32)> = vec![("tandem", t.url.clone(), t.pid())];
        if let Some(n) = &n {
            targets.push(("nginx", n.url.clone(), n.pid()));
        }
        let mut windows: Vec<Vec<Window>> = vec![Vec::new(); targets.len() + 1];
        for round in 0..a.rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..=targets.len()).collect()
            } else {
                (0..=targets.len()).rev().collect()
            };
            for i in order {
                let w = if i == targets.len() {
                    direct_throughput(&fast_refs, &a).await
                } else {
                    throughput(&targets[i].1, targets[i].2, a.streams, &a).await
                };
                windows[i].push(w);
            }
        }
        println!("\n  throughput (median of {} rounds)", a.rounds);
        println!(
            "    {:<8} {:>12} {:>18} {:>16} {:>18} {:>8}",
            "", "tokens/s", "proxy CPU s / 1M", "writes / token", "client CPU s / 1M", "errors"
        );
        let names: Vec<&str> = targets.iter().map(|t| t.0).chain(["direct"]).collect();
        let mut tp = serde_json::Map::new();
        for (name, ws) in names.iter().zip(&windows) {
            let med = |f: &dyn Fn(&Window) -> f64| {
                let mut v: Vec<f64> = ws.iter().map(f).collect();
                crate::harness::pct(&mut v, 0.5).unwrap_or(f64::NAN)
            };
            let tps = med(&|w| w.tokens_per_s());
            let cpu = med(&|w| w.per_million(w.proxy.cpu_s));
            let writes = med(&|w| w.proxy.writes as f64 / w.tokens.max(1) as f64);
            let client_cpu = med(&|w| w.per_million(w.client_cpu_s));
            let errors: u64 = ws.iter().map(|w| w.errors).sum();
            let proxied = *name != "direct";
            println!(
                "    {name:<8} {tps:>12.0} {:>18} {:>16} {client_cpu:>18.2} {errors:>8}",
                if proxied {
                    format!("{cpu:.2}")
                } else {
                    "—".into()
                },
                if proxied {
                    format!("{writes:.3}")
                } else {
                    "—".into()
                },
            );
            tp.insert(
            name.to_string(),
            json!({"tokens_per_s": tps, "proxy_cpu_s_per_million": proxied.then_some(cpu),
                "proxy_writes_per_token": proxied.then_some(writes),
                "client_cpu_s_per_million": client_cpu, "errors": errors,
                "rounds": ws.iter().map(|w| json!({"tokens_per_s": w.tokens_per_s(),
                    "proxy_cpu_s_per_million": w.per_million(w.proxy.cpu_s)})).collect::<Vec<_>>()}),
        );
        }
        out.insert("throughput".into(), tp.into());
        drop((t, n, fast));
    }

    // 2 and 3. Memory: slow engines, so streams stay open.
    let (hold, bursts_on) = (
        a.phase("memory") && !a.hold.is_empty(),
        a.phase("bursts") && a.bursts > 0,
    );
    if hold || bursts_on {
        let most = a
            .hold
            .iter()
            .copied()
            .chain([a.burst_streams])
            .max()
            .unwrap_or(0);
        let per_engine = (most / a.engines.max(1) + 64).to_string();
        let blocks = (most / a.engines.max(1) * 300 / 16 + 10_000).to_string();
        let slow = sims(
            a.engines,
            &[
                "--max-num-seqs",
                &per_engine,
                "--num-gpu-blocks-override",
                &blocks,
                // A token every second or so per stream: streams held open, not a load.
                "--time-scale",
                "0.05",
            ],
        )
        .await?;
        let slow_refs: Vec<&Proc> = slow.iter().collect();
        let settle = Duration::from_secs_f64(a.settle_secs);
        let mut mem = serde_json::Map::new();
        let mut targets: Vec<(&str, Proc)> = vec![("tandem", tandem(&slow_refs, &dir).await?)];
        if let Some(b) = &nginx_bin {
            targets.push(("nginx", nginx(b, &slow_refs, &dir).await?));
        }
        for (name, p) in &targets {
            let mut v = serde_json::Map::new();
            if hold {
                println!("\n  memory, {name}: slow streams held open");
                v.insert(
                    "hold".into(),
                    memory(&p.url, p.pid(), &a.hold, settle).await,
                );
            }
            if bursts_on && (*name == "tandem" || a.nginx_bursts) {
                println!(
                    "\n  bursts, {name}: {} x {} streams",
                    a.bursts, a.burst_streams
                );
                v.insert("bursts".into(), bursts(&p.url, p.pid(), &a).await);
            }
            mem.insert(name.to_string(), v.into());
        }
        out.insert("memory".into(), mem.into());
    }

    // 4. Added TTFT, all targets at once over one engine.
    if a.phase("ttft") && a.ttft_streams > 0 {
        let e = sim(&["--model", "llama-3.1-8b"]).await?;
        let t = tandem(&[&e], &dir).await?;
        let n = match &nginx_bin {
            Some(b) => Some(nginx(b, &[&e], &dir).await?),
            None => None,
        };
        let mut bases = vec![e.url.clone(), t.url.clone()];
        if let Some(n) = &n {
            bases.push(n.url.clone());
        }
        // One warm-up request per stream, then the measured ones.
        let warm = split_load(&bases, a.ttft_streams, 1).await;
        drop(warm);
        let mut runs = split_load(&bases, a.ttft_streams, a.ttft_requests).await;
        let (dm, d99) = stats(&mut runs[0].ttft);
        println!(
            "\n  added TTFT over direct ({} streams x {} requests, 32 tokens, one llama-3.1-8b engine)",
            a.ttft_streams, a.ttft_requests
        );
        println!(
            "    {:<8} {:>10} {:>10} {:>14} {:>14}",
            "", "mean ms", "p99 ms", "added mean", "added p99"
        );
        let mut tt = serde_json::Map::new();
        for (i, name) in ["direct", "tandem", "nginx"]
            .iter()
            .enumerate()
            .take(bases.len())
        {
            let errors = runs[i].errors;
            let (m, p99) = stats(&mut runs[i].ttft);
            println!(
                "    {name:<8} {:>10.3} {:>10.3} {:>14.3} {:>14.3}   ({} ok, {errors} errors)",
                m * 1e3,
                p99 * 1e3,
                (m - dm) * 1e3,
                (p99 - d99) * 1e3,
                runs[i].e2e.len()
            );
            tt.insert(
                name.to_string(),
                json!({"mean_ms": m * 1e3, "p99_ms": p99 * 1e3, "added_mean_ms": (m - dm) * 1e3,
                    "added_p99_ms": (p99 - d99) * 1e3, "errors": errors}),
            );
        }
        out.insert("ttft".into(), tt.into());
    }
    if let Some(path) = &a.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&serde_json::Value::Object(out))?,
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Direct throughput: the streams split evenly over the engines, measured as one window.
async fn direct_throughput(engines: &[&Proc], a: &RelayArgs) -> Window {
    let per = a.streams / engines.len().max(1);
    let ws = futures::future::join_all(engines.iter().map(|e| throughput(&e.url, 0, per, a))).await;
    ws.iter().fold(
        Window {
            secs: ws[0].secs,
            ..Window::default()
        },
        |acc, w| Window {
            tokens: acc.tokens + w.tokens,
            client_cpu_s: w.client_cpu_s,
            errors: acc.errors + w.errors,
            ..acc
        },
    )
}

/// `streams` closed-loop streams, stream `i` to `bases[i % len]`, each `requests` requests of 32
/// tokens; one `Run` per base.
async fn split_load(bases: &[String], streams: usize, requests: usize) -> Vec<Run> {
    let client = client(streams);
    let body = Arc::new(json!({"prompt": "tandem benchmark prompt ".repeat(21),
        "max_tokens": 32, "ignore_eos": true, "stream": true}));
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let (client, body, url) = (
                client.clone(),
                body.clone(),
                format!("{}/v1/completions", bases[i % bases.len()]),
            );
            // Arrivals spread over a second, not one synchronized wave.
            let delay = Duration::from_millis(1000 * i as u64 / streams.max(1) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut run = Run::default();
                for _ in 0..requests {
                    one(&client, &url, &body, &mut run).await;
                }
                run
            })
        })
        .collect();
    let mut all: Vec<Run> = bases.iter().map(|_| Run::default()).collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap_or_default();
        let into = &mut all[i % bases.len()];
        into.ttft.extend(r.ttft);
        into.e2e.extend(r.e2e);
        into.errors += r.errors;
    }
    all
}

/// This process's open-file limit (`ulimit -n`), which its children inherit: a proxy holding N
/// streams needs about 2N descriptors, and this process N.
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_text_chunks_across_boundaries() {
        let mut c = TokenCounter::default();
        let ev = b"data: {\"choices\":[{\"index\":0,\"text\":\" a\"}]}\n\n";
        let empty = b"data: {\"choices\":[{\"index\":0,\"text\":\"\"}]}\n\n";
        let all: Vec<u8> = [&ev[..], empty, ev, ev].concat();
        // Every split point gives the same count: three chunks with text.
        for cut in 0..all.len() {
            let mut c2 = TokenCounter::default();
            let n = c2.count(&all[..cut]) + c2.count(&all[cut..]);
            assert_eq!(n, 3, "cut at {cut}");
        }
        assert_eq!(c.count(ev), 1);
    }

    #[test]
    fn reads_this_process_from_proc() {
        let u = usage(std::process::id());
        assert!(u.rss_kib > 0);
    }
}
