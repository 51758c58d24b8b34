//! API keys: requests without a valid key are refused before anything else happens, keys are
//! rotated by rewriting the key file, and the open routes stay open.

use std::time::Duration;

use serde_json::{json, Value};

use super::{
    assert_error, auth_table, completion, get_status, send, tandem, tenants, KeyFile, MODEL,
};
use crate::support::Sim;

/// Finding: with no `Authorization`, a wrong bearer token or garbage credentials, requests were
/// served. With `[auth]` on, each gets 401 in vLLM's error shape (naming nothing it was sent),
/// no engine sees it, and a good key is served.
#[tokio::test]
async fn requests_without_a_valid_key_are_refused() {
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&[("team-a", "")]));
    let t = tandem(&d, &auth_table(&keys)).await;
    let body = completion(2);
    let bad: [(&str, Option<&str>); 6] = [
        ("no Authorization", None),
        ("a wrong bearer token", Some("Bearer sk-wrong")),
        ("a near miss", Some("Bearer sk-team-a2")),
        (
            "garbage Basic credentials",
            Some("Basic Z2FyYmFnZTpnYXJiYWdl"),
        ),
        ("a bare key", Some("sk-team-a")),
        ("an empty bearer", Some("Bearer ")),
    ];
    for (what, header) in bad {
        for (method, path) in [
            (reqwest::Method::POST, "/v1/completions"),
            (reqwest::Method::POST, "/v1/chat/completions"),
            (reqwest::Method::POST, "/tokenize"),
            (reqwest::Method::GET, "/v1/models"),
        ] {
            let mut req = t.client.request(method, format!("{}{path}", t.url));
            if path != "/v1/models" {
                req = req.json(&body);
            }
            if let Some(h) = header {
                req = req.header("authorization", h);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{what} {path}"
            );
            let text = resp.text().await.unwrap();
            assert!(
                !text.contains("sk-"),
                "{what}: the answer quotes the key: {text}"
            );
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_error(status, &v, 401, "UnauthorizedError");
        }
    }
    let seen: Value = d.get("/admin/requests").await.json().await.unwrap();
    assert_eq!(
        seen["requests"],
        json!([]),
        "an engine saw a refused request: {seen}"
    );
    assert_eq!(
        t.admin()
            .metric("tandem_auth_rejected_total", &[("reason", "missing")])
            .await,
        4.0
    );
    // Probes never need a key.
    for path in ["/health", "/ready", "/version", "/ping"] {
        assert_eq!(get_status(&t, path, None).await, 200, "{path}");
    }
    // The key itself: served, in both spellings of the scheme.
    let ok = send(&t, "/v1/completions", Some("sk-team-a"), &body).await;
    assert_eq!(ok.status(), 200);
    let chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let resp = t
        .client
        .post(format!("{}/v1/chat/completions", t.url))
        .header("authorization", "bearer sk-team-a")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(get_status(&t, "/v1/models", Some("sk-team-a")).await, 200);
}

/// Keys are accepted, rejected and rotated by rewriting the file, without a restart; a file
/// rewritten into nonsense keeps the keys in force.
#[tokio::test]
async fn keys_are_rotated_by_rewriting_the_key_file() {
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&[("team-a", "")]));
    let t = tandem(&d, &auth_table(&keys)).await;
    let body = completion(2);
    let status = |key: &'static str| {
        let (t, body) = (&t, &body);
        async move {
            send(t, "/v1/completions", Some(key), body)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("sk-team-a").await, 200);
    assert_eq!(status("sk-rotated").await, 401);

    // Both keys for a while, as a rotation goes: the new one is added...
    keys.write(&format!(
        "{}\n[[keys]]\nkey = \"sk-rotated\"\ntenant = \"team-a\"\n",
        tenants(&[("team-a", "")])
    ));
    assert!(
        wait_for(|| status("sk-rotated"), 200).await,
        "the added key"
    );
    assert_eq!(status("sk-team-a").await, 200);
    // ...then the old one goes.
    keys.write(
        "[[tenants]]\nname = \"team-a\"\n[[keys]]\nkey = \"sk-rotated\"\ntenant = \"team-a\"\n",
    );
    assert!(
        wait_for(|| status("sk-team-a"), 401).await,
        "the removed key"
    );
    assert_eq!(status("sk-rotated").await, 200);

    // A broken file is refused and counted; the keys in force stay.
    let admin = t.admin();
    let errors = || admin.metric("tandem_auth_reloads_total", &[("result", "error")]);
    assert_eq!(errors().await, 0.0);
    keys.write("[[keys]]\nkey = \"sk-half-written");
    let seen = admin
        .wait_metric("tandem_auth_reloads_total", &[("result", "error")], |v| {
            v >= 1.0
        })
        .await;
    assert_eq!(seen, 1.0);
    assert_eq!(status("sk-rotated").await, 200);
    assert_eq!(status("sk-half-written").await, 401);
    assert_eq!(admin.metric("tandem_auth_keys", &[]).await, 1.0);
}

/// Poll `f` until it gives `want`, at most 400 times 25 ms apart (the file is re-read every
/// 50 ms); whether it did.
async fn wait_for<F, Fut>(f: F, want: u16) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    for _ in 0..400 {
        if f().await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Keys unlikely to occur anywhere by chance, so their absence from the logs means something.
const FIRST: &str = "sk-k8s-first-5b1e9f02";
const SECOND: &str = "sk-k8s-second-c7d4a611";
const GUESS: &str = "sk-k8s-guess-0e8b3f5d";
const BROKEN: &str = "sk-k8s-broken-77a0c2e4";

/// A key directory laid out as the kubelet mounts a Secret: `keys.toml -> ..data/keys.toml`,
/// `..data -> ..<timestamp>`, and an update writes a new timestamped directory and swaps
/// `..data` to it with one `rename`, then removes the old directory.
struct SecretMount {
    dir: std::path::PathBuf,
    version: u32,
}

impl SecretMount {
    fn new(text: &str) -> SecretMount {
        let dir = crate::support::temp_dir("secret");
        let mut m = SecretMount { dir, version: 0 };
        m.update(text);
        std::os::unix::fs::symlink("..data/keys.toml", m.dir.join("keys.toml")).unwrap();
        m
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("keys.toml")
    }

    fn update(&mut self, text: &str) {
        let old = format!("..2026_12_02_08_00_{:02}.{}", self.version, self.version);
        self.version += 1;
        let new = format!("..2026_12_02_08_00_{:02}.{}", self.version, self.version);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        std::fs::write(self.dir.join(&new).join("keys.toml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

impl Drop for SecretMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tandem serve` with its stdout and stderr captured, logging at debug level (trace for
/// Tandem's own crates), to look for key material in everything it writes.
struct Logged {
    child: tokio::process::Child,
    peer: crate::support::Peer,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    config: std::path::PathBuf,
}

impl Logged {
    async fn start(config: &str) -> Logged {
        use std::process::Stdio;
        use tokio::io::{AsyncBufReadExt, BufReader};
        let path = crate::support::temp_dir("logged").join("tandem.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                "debug,tandem=trace,tandem_app=trace,tandem_proxy=trace,tandem_config=trace",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tandem serve");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready_line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
            .await
            .expect("a ready line within 60 s")
            .unwrap()
            .expect("a ready line before exit");
        let ready: Value = serde_json::from_str(&ready_line).expect("the ready line is JSON");
        lines.lock().unwrap().push(ready_line);
        let keep = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                keep.lock().unwrap().push(l);
            }
        });
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let keep = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err.next_line().await {
                keep.lock().unwrap().push(l);
            }
        });
        let peer = crate::support::Peer {
            url: ready["http"].as_str().unwrap().to_string(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        let mut ready = 0;
        for _ in 0..400 {
            ready = get_status(&peer, "/ready", None).await;
            if ready == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(ready, 200, "tandem never ready");
        Logged {
            child,
            peer,
            lines,
            config: path,
        }
    }

    /// Whether a line written so far contains `text`.
    fn logged(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Stop the process and return everything it wrote.
    async fn stop(mut self) -> String {
        let pid = self.child.id().expect("running").to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        // The readers drain the pipes to their ends once the process has exited.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = std::fs::remove_dir_all(self.config.parent().unwrap());
        self.lines.lock().unwrap().join("\n")
    }
}

/// Acceptance 1 with a Kubernetes Secret mount: a key rotated by swapping the `..data` symlink
/// (the kubelet's atomic update) is picked up without a restart, the removed key stops
/// working, and nothing Tandem logs, at any level, carries a key or its SHA-256 digest.
#[tokio::test]
async fn keys_rotate_through_a_secret_symlink_swap_and_never_reach_the_logs() {
    let d = Sim::start(&[]).await;
    let mut mount = SecretMount::new(&format!(
        "[[tenants]]\nname = \"team-k\"\n\n[[keys]]\nkey = \"{FIRST}\"\ntenant = \"team-k\"\n"
    ));
    let extra = format!(
        "[auth]\nkeys_file = \"{}\"\nreload_interval_ms = 50\n",
        mount.path().display()
    );
    let t = Logged::start(&super::config(&d, false, &extra)).await;
    let body = completion(2);
    let status = |key: &'static str| {
        let (t, body) = (&t, &body);
        async move {
            send(&t.peer, "/v1/completions", Some(key), body)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(FIRST).await, 200);
    assert_eq!(status(SECOND).await, 401);
    assert_eq!(status(GUESS).await, 401);

    mount.update(&format!(
        "[[tenants]]\nname = \"team-k\"\n\n[[keys]]\nkey = \"{SECOND}\"\ntenant = \"team-k\"\n"
    ));
    assert!(wait_for(|| status(SECOND), 200).await, "the swapped-in key");
    assert_eq!(status(FIRST).await, 401, "the swapped-out key");
    assert_eq!(status(GUESS).await, 401);
    // A half-written Secret (its error is logged) keeps the keys in force, and its text, a
    // key included, is not in the log line that reports it.
    mount.update(&format!("[[keys]]\nkey = \"{BROKEN}"));
    let mut warned = false;
    for _ in 0..400 {
        warned = t.logged("the changed API key file is invalid");
        if warned {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(warned, "the broken file was never reported");
    assert_eq!(status(SECOND).await, 200);
    // A second swap (a second rotation works the same way, off the new directory).
    mount.update(&format!(
        "[[tenants]]\nname = \"team-k\"\n\n[[keys]]\nkey = \"{FIRST}\"\ntenant = \"team-k\"\n"
    ));
    assert!(wait_for(|| status(FIRST), 200).await, "swapped back");
    assert_eq!(status(SECOND).await, 401);

    let log = t.stop().await;
    eprintln!("secret mount: {} log lines checked", log.lines().count());
    if std::env::var("TANDEM_IT_SHOW_LOG").is_ok() {
        eprintln!("{log}");
    }
    // The capture works: the loads and both reloads were logged.
    assert!(log.contains("API keys loaded"), "{log}");
    assert_eq!(log.matches("API keys reloaded").count(), 2, "{log}");
    for key in [FIRST, SECOND, GUESS, BROKEN] {
        assert!(!log.contains(key), "the log carries {key}");
        // The digest Tandem keeps in memory (no SHA-256 crate among the tests' dependencies).
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s '{key}' | sha256sum")])
            .output()
            .expect("run sha256sum");
        let digest = String::from_utf8(out.stdout).unwrap();
        let digest = digest.split(' ').next().unwrap();
        assert_eq!(digest.len(), 64, "{digest}");
        assert!(!log.contains(digest), "the log carries the digest of {key}");
    }
    assert!(!log.contains("sk-k8s"), "the log carries a key's prefix");
}
