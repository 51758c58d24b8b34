//! Budgets shared through a real Redis: two Tandem processes enforce one budget together, keep
//! serving on local budgets when Redis is killed, and share again when it is back.
//!
//! The tests need `redis-server`: `TANDEM_REDIS_SERVER`, else the one on PATH. Without one they
//! say so and pass, unless `TANDEM_REQUIRE_REDIS=1` (set by `.ci/run`, which installs it), when
//! they fail. Each Redis listens on a unix socket in its own temporary directory: no port to race
//! for.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::{auth_table, completion, send, tandem, tenants, KeyFile};
use crate::support::{Sim, Tandem};

/// The `redis-server` to run, or `None` (after saying why) when the test should be skipped.
fn redis_server(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("TANDEM_REDIS_SERVER")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        });
    match found {
        Some(p) => Some(p),
        None if std::env::var("TANDEM_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!(
                "{test}: TANDEM_REQUIRE_REDIS=1 but no redis-server (TANDEM_REDIS_SERVER or PATH)"
            )
        }
        None => {
            eprintln!(
                "skipping {test}: no redis-server found (set TANDEM_REDIS_SERVER or put it on \
                 PATH; `apt-get install redis-server`)"
            );
            None
        }
    }
}

/// A `redis-server` child on a unix socket, without persistence; killed on drop.
struct Redis {
    child: Child,
    bin: PathBuf,
    dir: PathBuf,
}

impl Redis {
    async fn start(bin: &Path) -> Redis {
        let dir = crate::support::temp_dir("redis");
        let child = Redis::spawn(bin, &dir).await;
        Redis {
            child,
            bin: bin.to_path_buf(),
            dir,
        }
    }

    fn socket(dir: &Path) -> PathBuf {
        dir.join("redis.sock")
    }

    fn url(&self) -> String {
        format!("unix://{}", Redis::socket(&self.dir).display())
    }

    /// Start one on `dir`'s socket and wait for its ready line, then for PONG.
    async fn spawn(bin: &Path, dir: &Path) -> Child {
        let sock = Redis::socket(dir);
        let mut child = Command::new(bin)
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&sock)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let ready = async {
            while let Some(l) = lines.next_line().await.expect("read redis-server's log") {
                // 7.0: "The server is now ready to accept connections at <socket>"; 7.2 on:
                // "Ready to accept connections unix".
                if l.to_ascii_lowercase()
                    .contains("ready to accept connections")
                {
                    return true;
                }
            }
            false
        };
        let ready = tokio::time::timeout(Duration::from_secs(30), ready).await;
        assert!(matches!(ready, Ok(true)), "redis-server never became ready");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut s = tokio::net::UnixStream::connect(&sock)
            .await
            .expect("connect to redis-server");
        s.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"+PONG\r\n");
        child
    }

    /// SIGKILL: Redis vanishes as in a crash.
    async fn kill(&mut self) {
        self.child.start_kill().expect("kill redis-server");
        let _ = self.child.wait().await;
    }

    /// A fresh (empty) Redis on the same socket.
    async fn restart(&mut self) {
        self.child = Redis::spawn(&self.bin, &self.dir).await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn limits_table(redis: &Redis) -> String {
    // A generous timeout: a slow CI machine must not turn a check into a local one here.
    format!(
        "[limits]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_timeout_ms = 5000\n\
         redis_retry_ms = 100\n",
        redis.url()
    )
}

const KEYS: [(&str, &str); 3] = [
    ("shared", "requests_per_minute = 10"),
    ("solo", "requests_per_minute = 3"),
    ("big", "requests_per_minute = 100000"),
];

/// Two coordinators over one engine, sharing `redis`, both connected to it.
async fn pair(d: &Sim, keys: &KeyFile, redis: &Redis) -> [Tandem; 2] {
    let extra = format!("{}{}", auth_table(keys), limits_table(redis));
    let ts = [tandem(d, &extra).await, tandem(d, &extra).await];
    for t in &ts {
        let up = t
            .admin()
            .wait_metric("tandem_limits_backend_up", &[], |v| v == 1.0)
            .await;
        assert_eq!(up, 1.0, "never connected to Redis");
    }
    ts
}

async fn status(t: &Tandem, key: &str) -> u16 {
    send(t, "/v1/completions", Some(key), &completion(2))
        .await
        .status()
        .as_u16()
}

/// Two processes, one budget: 30 requests of a tenant allowed 10 a minute, spread over both,
/// are admitted 10 times in all (plus what refilled meanwhile), never 10 on each.
#[tokio::test]
async fn two_processes_sharing_redis_enforce_one_budget() {
    let Some(bin) = redis_server("two_processes_sharing_redis_enforce_one_budget") else {
        return;
    };
    let redis = Redis::start(&bin).await;
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&KEYS));
    let ts = pair(&d, &keys, &redis).await;
    let started = Instant::now();
    let codes: Vec<u16> = futures::stream::iter(0..30)
        .map(|i| status(&ts[i % 2], "sk-shared"))
        .buffer_unordered(6)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let ok = codes.iter().filter(|c| **c == 200).count();
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    let allowed = 10 + (elapsed.as_secs_f64() * 10.0 / 60.0).ceil() as usize;
    assert!(
        (10..=allowed).contains(&ok),
        "{ok} admitted by the two together, at most {allowed} allowed"
    );
    let mut refused = 0.0;
    for t in &ts {
        let admin = t.admin();
        refused += admin
            .metric(
                "tandem_limits_rejected_total",
                &[("tenant", "shared"), ("reason", "requests")],
            )
            .await;
        assert_eq!(admin.metric("tandem_limits_fallback_total", &[]).await, 0.0);
    }
    assert_eq!(refused, (30 - ok) as f64);
}

/// Redis killed: both keep serving, on local budgets (each enforces the whole budget itself),
/// with the fallback logged and counted and `/ready` warning; Redis back: shared again.
#[tokio::test]
async fn with_redis_killed_limits_fall_back_to_local_and_recover() {
    let Some(bin) = redis_server("with_redis_killed_limits_fall_back_to_local_and_recover") else {
        return;
    };
    let mut redis = Redis::start(&bin).await;
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&KEYS));
    let ts = pair(&d, &keys, &redis).await;
    for t in &ts {
        assert_eq!(status(t, "sk-big").await, 200);
    }

    redis.kill().await;
    for t in &ts {
        // Never an outage: the check that finds Redis gone is decided locally.
        assert_eq!(status(t, "sk-big").await, 200);
        let admin = t.admin();
        assert_eq!(
            admin
                .wait_metric("tandem_limits_backend_up", &[], |v| v == 0.0)
                .await,
            0.0
        );
        assert!(admin.metric("tandem_limits_fallback_total", &[]).await >= 1.0);
        let (_, ready) = t.ready().await;
        let warned = ready["warnings"].as_array().unwrap().iter().any(|w| {
            w.as_str()
                .unwrap_or("")
                .contains("limits backend redis unreachable")
        });
        assert!(warned, "{ready}");
    }
    // Local limits hold: a tenant allowed 3 a minute gets 3 from one process...
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..6 {
        if status(&ts[0], "sk-solo").await == 200 {
            ok += 1;
        }
    }
    let allowed = 3 + (started.elapsed().as_secs_f64() * 3.0 / 60.0).ceil() as usize;
    assert!((3..=allowed).contains(&ok), "{ok} of 6, at most {allowed}");
    // ...and, without the shared count, 3 more from the other.
    assert_eq!(status(&ts[1], "sk-solo").await, 200);

    redis.restart().await;
    for t in &ts {
        let admin = t.admin();
        assert_eq!(
            admin
                .wait_metric("tandem_limits_backend_up", &[], |v| v == 1.0)
                .await,
            1.0,
            "never reconnected"
        );
        let before = admin.metric("tandem_limits_fallback_total", &[]).await;
        assert_eq!(status(t, "sk-big").await, 200);
        assert_eq!(
            admin.metric("tandem_limits_fallback_total", &[]).await,
            before,
            "decided locally with Redis back"
        );
    }
}
