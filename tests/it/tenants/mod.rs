//! The front door for shared use, through the real binary: API keys (`auth.rs`), the admin
//! listener and client-sent KV params (`surface.rs`), tenants' budgets in one process
//! (`limits.rs`) and shared through a real Redis by two processes (`shared.rs`).

mod auth;
mod limits;
mod shared;
mod surface;

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::support::{Peer, Sim, Tandem, PROMPT};

/// The served model name of the `qwen3-0.6b` profile.
const MODEL: &str = "Qwen/Qwen3-0.6B";

fn completion(max_tokens: u64) -> Value {
    json!({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true})
}

/// `tandem serve` over one decode sim, everything run there; `admin` adds `admin_listen`, and
/// `extra` whole tables.
fn config(d: &Sim, admin: bool, extra: &str) -> String {
    let admin = if admin {
        "admin_listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{admin}\n\
         [pools.prefill]\nendpoints = []\n\n\
         [pools.decode]\nendpoints = [\"{}\"]\n\n\
         [disaggregation]\nmode = \"never\"\n\n\
         [health]\ninterval_ms = 100\n\n{extra}\n",
        d.url
    )
}

/// `[auth]` over `keys`, re-read every 50 ms.
fn auth_table(keys: &KeyFile) -> String {
    format!(
        "[auth]\nkeys_file = \"{}\"\nreload_interval_ms = 50\n",
        keys.path.display()
    )
}

/// A key file in its own temporary directory (removed on drop), rewritten atomically as a
/// Secret mount is (a reader never sees half a file).
struct KeyFile {
    dir: PathBuf,
    path: PathBuf,
}

impl KeyFile {
    fn new(text: &str) -> KeyFile {
        let dir = crate::support::temp_dir("keys");
        let k = KeyFile {
            path: dir.join("keys.toml"),
            dir,
        };
        k.write(text);
        k
    }

    fn write(&self, text: &str) {
        let tmp = self.dir.join("keys.toml.new");
        std::fs::write(&tmp, text).expect("write the key file");
        std::fs::rename(&tmp, &self.path).expect("swap the key file in");
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One tenant per `(name, limits)` (`limits`: TOML lines), each with the key `sk-<name>`.
fn tenants(list: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (name, limits) in list {
        s += &format!("[[tenants]]\nname = \"{name}\"\n{limits}\n\n");
    }
    for (name, _) in list {
        s += &format!("[[keys]]\nkey = \"sk-{name}\"\ntenant = \"{name}\"\n\n");
    }
    s
}

/// POST `body` to `path` with `Authorization: Bearer <key>` (or none).
async fn send(peer: &Peer, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = peer.client.post(format!("{}{path}", peer.url)).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.expect("request sent")
}

/// GET `path` with a key (or none): the status.
async fn get_status(peer: &Peer, path: &str, key: Option<&str>) -> u16 {
    let mut req = peer.client.get(format!("{}{path}", peer.url));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.expect("request sent").status().as_u16()
}

/// vLLM's error body with this status and type.
fn assert_error(status: u16, v: &Value, code: u16, kind: &str) {
    assert_eq!(status, code, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert!(e.get("param").is_some_and(Value::is_null), "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "only `error`: {v}");
}

/// Start a coordinator over `d` with `extra` tables and the admin listener.
async fn tandem(d: &Sim, extra: &str) -> Tandem {
    Tandem::start(&config(d, true, extra)).await
}
