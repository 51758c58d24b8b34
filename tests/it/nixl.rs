//! Real KV bytes over NIXL (`--kv-transport nixl`, feature `nixl`): a prefill and a decode sim,
//! each with its own NIXL agent and UCX backend, the decode side pulling the prompt's blocks by
//! NIXL READ. Needs the NIXL libraries (LD_LIBRARY_PATH, NIXL_PLUGIN_DIR; see .ci/run); run with
//! `--test-threads=1`, as nixl-sys advises.

use serde_json::{json, Value};

use crate::support::{decode_leg, prefill_leg, read_sse, temp_dir, Sim, PROMPT};

/// Bytes of one block in one layer region on the sims below, and qwen3-0.6b's layer count.
const BLOCK_BYTES: f64 = 256.0;
const LAYERS: f64 = 28.0;

fn client_body() -> Value {
    json!({"prompt": PROMPT, "max_tokens": 12, "ignore_eos": true, "stream": true})
}

async fn nixl_sim(extra: &[&str]) -> Sim {
    let mut args = vec![
        "--seed",
        "3",
        "--kv-transport",
        "nixl",
        "--nixl-block-bytes",
        "256",
        "--num-gpu-blocks-override",
        "512",
    ];
    args.extend_from_slice(extra);
    let s = Sim::start(&args).await;
    assert_eq!(s.ready["kv_transport"], "nixl", "{}", s.ready);
    assert!(s.ready["nixl_agent"].is_string(), "{}", s.ready);
    s
}

/// Prefill leg on `p`; returns the kv_transfer_params and the prompt's block count.
async fn prefill(p: &Sim, body: &Value, id: &str) -> (Value, usize) {
    let (status, pr) = p
        .post_json("/v1/completions", &prefill_leg(body), Some(id))
        .await;
    assert_eq!(status, 200, "{pr}");
    let kv = pr["kv_transfer_params"].clone();
    let blocks = kv["remote_block_ids"].as_array().expect("block ids").len();
    (kv, blocks)
}

async fn assert_freed(p: &Sim) {
    let usage = p
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0, "the prefill engine still pins blocks");
}

#[tokio::test]
async fn nixl_read_gives_the_colocated_text_and_the_notification_frees_the_blocks() {
    let (p, d, c) = tokio::join!(
        nixl_sim(&["--hash-seed", "p"]),
        nixl_sim(&["--hash-seed", "d"]),
        Sim::start(&["--seed", "3", "--hash-seed", "c"]),
    );
    let body = client_body();
    let want = read_sse(c.post("/v1/completions", &body, None).await)
        .await
        .text();
    let (kv, blocks) = prefill(&p, &body, "nixl-1").await;
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);
    let out = read_sse(
        d.post("/v1/completions", &decode_leg(&body, &kv), Some("nixl-1"))
            .await,
    )
    .await;
    assert!(out.done && !out.cut);
    assert_eq!(out.text(), want, "text over NIXL must equal colocated text");
    // One real READ, its bytes counted as moved: every layer of every block, checked on arrival.
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        1.0
    );
    assert_eq!(
        d.metric("vllm:nixl_bytes_transferred_sum", &[]).await,
        blocks as f64 * LAYERS * BLOCK_BYTES
    );
    assert_eq!(
        d.metric("vllm:nixl_num_descriptors_sum", &[]).await,
        blocks as f64 * LAYERS
    );
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        0.0
    );
    // The notification rode on the READ; the prefill engine freed the blocks on receipt.
    assert_freed(&p).await;
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0
    );
}

/// A P/D pair over NIXL with `fault` on the prefill side; the decode leg's response.
async fn faulted(fault: Value, d_policy: &str) -> (Sim, Sim, reqwest::Response) {
    let d_flags = ["--kv-load-failure-policy", d_policy];
    let (p, d) = tokio::join!(nixl_sim(&[]), nixl_sim(&d_flags));
    p.faults(fault).await;
    let mut body = client_body();
    body["stream"] = json!(false);
    let (kv, _) = prefill(&p, &body, "nixl-f").await;
    let resp = d
        .post("/v1/completions", &decode_leg(&body, &kv), None)
        .await;
    (p, d, resp)
}

#[tokio::test]
async fn nixl_refused_read_fails_under_policy_fail_and_frees_the_blocks() {
    let (p, d, resp) = faulted(json!({"kv_refuse_next": 1}), "fail").await;
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
    assert_freed(&p).await;
}

#[tokio::test]
async fn nixl_corrupted_bytes_are_caught_and_recomputed_under_policy_recompute() {
    let c = Sim::start(&["--seed", "3"]).await;
    let mut body = client_body();
    body["stream"] = json!(false);
    let (_, colo) = c.post_json("/v1/completions", &body, None).await;
    let (p, d, resp) = faulted(json!({"kv_corrupt_next": 1}), "recompute").await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], colo["choices"][0]["text"]);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
    assert_freed(&p).await;
}

#[tokio::test]
async fn nixl_corrupted_bytes_fail_under_policy_fail() {
    let (p, d, resp) = faulted(json!({"kv_corrupt_next": 1}), "fail").await;
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
    assert_freed(&p).await;
    // The fault was one read: the next handoff over the same blocks is clean again.
    let mut body = client_body();
    body["stream"] = json!(false);
    let (kv, _) = prefill(&p, &body, "nixl-g").await;
    let (status, v) = d
        .post_json("/v1/completions", &decode_leg(&body, &kv), None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        1.0
    );
}

#[tokio::test]
async fn a_nixl_decode_engine_recomputes_when_the_prefill_has_no_nixl_agent() {
    // The prefill moves KV over the TCP stand-in: its handshake carries no loadable agent
    // metadata, so the decode engine's load fails and its policy (recompute) applies.
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "3"]),
        nixl_sim(&["--kv-load-failure-policy", "recompute"]),
        Sim::start(&["--seed", "3"]),
    );
    let mut body = client_body();
    body["stream"] = json!(false);
    let (_, colo) = c.post_json("/v1/completions", &body, None).await;
    let (kv, _) = prefill(&p, &body, "mixed-1").await;
    let (status, v) = d
        .post_json("/v1/completions", &decode_leg(&body, &kv), None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], colo["choices"][0]["text"]);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
}

/// `tandem bench nixl` starts its own prefill and decode sim processes; each handoff is exactly
/// one READ, and the decode sim's metrics count its real bytes and descriptors exactly (32
/// layers × 1 MiB-per-block prompts of 8-token blocks: S MiB is S × 32 descriptors) and its real,
/// non-zero duration.
#[tokio::test]
async fn bench_nixl_counts_the_real_bytes_of_each_read_between_two_sim_processes() {
    let json = temp_dir("bench-nixl").join("nixl.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "bench",
            "nixl",
            "--sizes",
            "1,4",
            "--iterations",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .await
        .expect("run tandem bench nixl");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let sizes = v["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 2, "{v}");
    for (s, mib) in sizes.iter().zip([1.0, 4.0]) {
        assert_eq!(s["bytes"].as_f64(), Some(mib * 1048576.0), "{s}");
        assert_eq!(s["descriptors"].as_f64(), Some(mib * 32.0), "{s}");
        let xfer: Vec<f64> = serde_json::from_value(s["xfer_s"].clone()).unwrap();
        assert_eq!(xfer.len(), 2, "{s}");
        assert!(xfer.iter().all(|&t| t > 0.0 && t < 30.0), "{s}");
    }
}
