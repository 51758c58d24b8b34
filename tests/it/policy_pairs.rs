//! Every prefill × decode policy pair, with `[disaggregation] enforce` off and on, is either a
//! valid configuration or refused by `tandem config check` with a message that names the key:
//! never a panic, never another exit code (issue 17, build item 8: `policy = "kv-capacity"` on
//! the prefill pool used to pass validation and then panic request tasks). Then requests through
//! `tandem serve` with `kv-capacity` on the prefill pool: served through a prefill engine while
//! its KV has room, run on the decode engine when it has none, and refused cleanly (503, in
//! vLLM's error shape) when `enforce` forbids that.

use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{temp_dir, Sim, Tandem, PROMPT};

const POLICIES: [&str; 7] = [
    "prefix",
    "kv-capacity",
    "least-loaded",
    "least-requests",
    "power-of-two",
    "round-robin",
    "random",
];

fn config(prefill: &str, decode: &str, enforce: bool) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [\"http://127.0.0.1:8100\", \"http://127.0.0.1:8101\"]\n\
         policy = \"{prefill}\"\n\n\
         [pools.decode]\nendpoints = [\"http://127.0.0.1:8200\"]\npolicy = \"{decode}\"\n\n\
         [disaggregation]\nmode = \"always\"\nenforce = {enforce}\n"
    )
}

/// `tandem config check` on `text` (written to a file in `dir`).
fn check(dir: &std::path::Path, name: &str, text: &str) -> Output {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the config");
    std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["config", "check"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tandem config check")
}

#[test]
fn config_check_accepts_or_refuses_every_policy_pair_cleanly() {
    let dir = temp_dir("policy-pairs");
    let mut accepted = 0;
    for p in POLICIES {
        for d in POLICIES {
            for enforce in [false, true] {
                let what = format!("prefill {p}, decode {d}, enforce {enforce}");
                let out = check(&dir, &format!("{p}-{d}-{enforce}"), &config(p, d, enforce));
                let (stdout, stderr) = (
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                );
                assert!(
                    !stderr.contains("panicked") && !stdout.contains("panicked"),
                    "{what}: {stderr}"
                );
                match out.status.code() {
                    // Valid: the effective configuration names both policies as written, with the
                    // formula in force for each pool.
                    Some(0) => {
                        assert!(
                            stdout.contains(&format!("policy = \"{p}\"")),
                            "{what}: {stdout}"
                        );
                        assert!(
                            stdout.contains(&format!("policy = \"{d}\"")),
                            "{what}: {stdout}"
                        );
                        assert!(
                            stdout.contains(&format!("# prefill policy {p}:")),
                            "{what}: {stdout}"
                        );
                        assert!(
                            stdout.contains(&format!("# decode policy {d}:")),
                            "{what}: {stdout}"
                        );
                        assert!(
                            stdout.contains(&format!("enforce = {enforce}")),
                            "{what}: {stdout}"
                        );
                        accepted += 1;
                    }
                    // Refused: the documented failure code with one `error:` line naming a pool.
                    Some(1) => assert!(
                        stderr.starts_with("error: ") && stderr.contains("pools."),
                        "{what}: refused without a clear message: {stderr}"
                    ),
                    other => panic!("{what}: exit {other:?}: {stderr}"),
                }
            }
        }
    }
    // Every pair has a meaning (a prefill policy that declines leaves the request to the
    // decode engine, or to `enforce`'s refusal), so none is refused today.
    assert_eq!(accepted, POLICIES.len() * POLICIES.len() * 2);

    // A name that is no policy is refused, naming the key, the name and the choices.
    for (pool, bad, text) in [
        (
            "prefill",
            "kv_capacity",
            config("kv_capacity", "kv-capacity", false),
        ),
        ("decode", "fastest", config("prefix", "fastest", true)),
    ] {
        let out = check(&dir, &format!("bad-{pool}"), &text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{pool}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.starts_with("error: ")
                && stderr.contains(&format!("pools.{pool}.policy"))
                && stderr.contains(bad)
                && stderr.contains("one of: prefix, kv-capacity, least-loaded"),
            "{pool}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn serve_config(prefill: &[&Sim], decode: &Sim, enforce: bool) -> String {
    let urls: Vec<&str> = prefill.iter().map(|s| s.url.as_str()).collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = {urls:?}\npolicy = \"kv-capacity\"\n\n\
         [pools.decode]\nendpoints = [\"{}\"]\npolicy = \"kv-capacity\"\n\n\
         [disaggregation]\nmode = \"always\"\nenforce = {enforce}\n\n\
         [health]\ninterval_ms = 25\nscrape_interval_ms = 25\n",
        decode.url
    )
}

/// POST a completion with a request id: (status, JSON).
async fn complete(t: &Tandem, id: &str) -> (u16, Value) {
    let body = json!({"prompt": PROMPT, "max_tokens": 4, "ignore_eos": true});
    t.post_json("/v1/completions", &body, Some(id)).await
}

/// Poll `/admin/engines` until every prefill engine shows all of its KV used (the sims were
/// told to hold every free block; the scrape must see it before routing can).
async fn wait_prefill_full(t: &Tandem) {
    let full = t
        .wait_engines("prefill", |e| {
            e["kv_total_blocks"].as_u64().is_some_and(|n| n > 0) && e["kv_free_blocks"] == 0
        })
        .await;
    assert!(full, "the scrape never saw full KV: {}", t.engines().await);
}

#[tokio::test]
async fn kv_capacity_on_the_prefill_pool_serves_or_refuses_cleanly() {
    let (p0, p1, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]), Sim::start(&[]));
    let prefill_urls = [p0.url.as_str(), p1.url.as_str()];

    // With room on the prefill engines, kv-capacity picks one and the request is disaggregated.
    let t = Tandem::start(&serve_config(&[&p0, &p1], &d, false)).await;
    // kv-capacity chooses only among engines whose KV it has scraped.
    let scraped = t
        .wait_engines("prefill", |e| {
            e["state"] == "healthy" && e["kv_free_blocks"].as_u64().is_some_and(|f| f > 0)
        })
        .await;
    assert!(scraped, "{}", t.engines().await);
    for i in 0..4 {
        let id = format!("roomy-{i}");
        let (status, v) = complete(&t, &id).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
        let r = t.record(&id).await;
        let p = r["prefill_engine"].as_str().unwrap_or_default();
        assert!(prefill_urls.contains(&p), "a prefill leg ran: {r}");
        assert_eq!(r["decode_engine"], d.url.as_str(), "{r}");
    }

    // No prefill engine has KV room: kv-capacity declines, and the request runs whole on the
    // decode engine (the fallback `enforce = false` allows) instead of panicking its task.
    p0.faults(json!({"exhaust_kv": true})).await;
    p1.faults(json!({"exhaust_kv": true})).await;
    wait_prefill_full(&t).await;
    let (status, v) = complete(&t, "declined").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    let r = t.record("declined").await;
    assert_eq!(r["prefill_engine"], Value::Null, "no prefill leg: {r}");
    assert_eq!(r["decode_engine"], d.url.as_str(), "{r}");
    drop(t);

    // With `enforce = true` the same decline is a clean refusal: 503 in vLLM's error shape,
    // naming no engine, and the coordinator keeps serving.
    let t = Tandem::start(&serve_config(&[&p0, &p1], &d, true)).await;
    wait_prefill_full(&t).await;
    for i in 0..3 {
        let resp = t
            .post(
                "/v1/completions",
                &json!({"prompt": PROMPT, "max_tokens": 4}),
                Some(&format!("enforced-{i}")),
            )
            .await;
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        assert_eq!(status, 503, "{text}");
        let v: Value = serde_json::from_str(&text).expect("a JSON error");
        assert_eq!(v["error"]["code"], 503, "{text}");
        assert!(v["error"]["message"].is_string(), "{text}");
        assert!(
            !text.contains("http://") && !text.contains("panicked"),
            "{text}"
        );
    }
    // Room again: served through a prefill engine.
    p0.faults(json!({"exhaust_kv": false})).await;
    p1.faults(json!({"exhaust_kv": false})).await;
    let mut served = false;
    for i in 0..200 {
        let (status, _) = complete(&t, &format!("again-{i}")).await;
        if status == 200 {
            let r = t.record(&format!("again-{i}")).await;
            assert!(
                prefill_urls.contains(&r["prefill_engine"].as_str().unwrap_or_default()),
                "{r}"
            );
            served = true;
            break;
        }
        assert_eq!(status, 503);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(served, "never served once the prefill KV was free");
}
