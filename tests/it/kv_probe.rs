//! `tandem kv-probe` against sims: it passes on a healthy pair and fails, naming the cause,
//! for each of the deployment faults it is there to find. In a build with feature `nixl` the
//! sims move KV over NIXL and the probe READs as a NIXL agent; the assertions hold either way.

use std::time::Duration;

use crate::support::{temp_dir, Sim};

/// Flags every sim here gets: NIXL transport when this build has it.
fn transport() -> Vec<&'static str> {
    if cfg!(feature = "nixl") {
        vec!["--kv-transport", "nixl", "--num-gpu-blocks-override", "256"]
    } else {
        Vec::new()
    }
}

async fn sim(extra: &[&str]) -> Sim {
    let mut args = vec!["--seed", "1"];
    args.extend(transport());
    args.extend_from_slice(extra);
    Sim::start(&args).await
}

/// Runs `tandem kv-probe ARGS`; (success, stdout).
async fn kv_probe(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("kv-probe")
            .args(args)
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("kv-probe finishes within 60 s")
    .expect("run kv-probe");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.success(), format!("{stdout}\n{stderr}"))
}

async fn probe_pair(p: &Sim, d: &Sim, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["--prefill", p.url.as_str(), "--decode", d.url.as_str()];
    args.extend_from_slice(extra);
    kv_probe(&args).await
}

/// The line of the report that starts with `tag what:`.
fn line<'a>(out: &'a str, tag: &str, what: &str) -> Option<&'a str> {
    let head = format!("{tag} {what}:");
    out.lines().map(str::trim).find(|l| l.starts_with(&head))
}

#[tokio::test]
async fn healthy_pair_passes_and_the_prefill_blocks_end_up_freed() {
    let (p, d) = tokio::join!(sim(&[]), sim(&[]));
    let (ok, out) = probe_pair(&p, &d, &[]).await;
    assert!(ok, "{out}");
    for what in ["prefill leg", "handshake", "layout", "decode leg"] {
        assert!(line(&out, "PASS", what).is_some(), "no PASS {what}:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    let handshake = line(&out, "PASS", "handshake").unwrap();
    assert!(handshake.contains(" ms "), "{handshake}");
    if cfg!(feature = "nixl") {
        let read = line(&out, "PASS", "NIXL READ").expect(&out);
        assert!(read.contains("every byte matches"), "{read}");
        assert!(
            line(&out, "note", "transport").is_some_and(|l| l.contains("UCX")),
            "{out}"
        );
    } else {
        let bytes = line(&out, "note", "bytes").expect(&out);
        assert!(bytes.contains("not checked"), "{bytes}");
    }
    // The decode engine pulled (by its own metrics) and the probe left nothing pinned.
    assert!(d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await >= 1.0);
    let usage = p
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(
        usage, 0.0,
        "the probe left blocks pinned on the prefill engine"
    );
    assert!(out.contains("kv-probe: all checks passed"), "{out}");
}

#[tokio::test]
async fn the_pools_of_a_config_file_are_probed_pair_by_pair() {
    let (p, d) = tokio::join!(sim(&[]), sim(&[]));
    let dir = temp_dir("kv-probe-config");
    let path = dir.join("tandem.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[pools.prefill]\nendpoints = [{:?}]\n\n\
         [pools.decode]\nendpoints = [{:?}]\n",
        p.url, d.url
    );
    std::fs::write(&path, toml).unwrap();
    let (ok, out) = kv_probe(&["--config", path.to_str().unwrap()]).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("kv-probe {} -> {}", p.url, d.url)),
        "{out}"
    );
}

#[tokio::test]
async fn mismatched_block_size_is_named() {
    let (p, d) = tokio::join!(sim(&[]), sim(&["--block-size", "32"]));
    let (ok, out) = probe_pair(&p, &d, &[]).await;
    assert!(!ok, "{out}");
    let l = line(&out, "FAIL", "block size").expect(&out);
    assert!(l.contains("prefill 16") && l.contains("decode 32"), "{l}");
}

#[tokio::test]
async fn mismatched_compatibility_hash_is_named_with_the_differing_factor() {
    let (p, d) = tokio::join!(sim(&[]), sim(&["--kv-cache-dtype", "fp8"]));
    let (ok, out) = probe_pair(&p, &d, &[]).await;
    assert!(!ok, "{out}");
    let l = line(&out, "FAIL", "compatibility hash").expect(&out);
    assert!(l.contains("NIXL compatibility hash mismatch"), "{l}");
    assert!(l.contains("cache_dtype: auto vs fp8"), "{l}");
}

#[tokio::test]
async fn stalled_handshake_is_named() {
    let (p, d) = tokio::join!(sim(&["--fault-handshake-stall"]), sim(&[]));
    let (ok, out) = probe_pair(&p, &d, &["--timeout", "1"]).await;
    assert!(!ok, "{out}");
    let l = line(&out, "FAIL", "handshake").expect(&out);
    assert!(l.contains("stalled"), "{l}");
}

#[tokio::test]
async fn refused_read_is_named_from_the_decode_engine() {
    let (p, d) = tokio::join!(sim(&["--fault-kv-refuse-next", "1"]), sim(&[]));
    let (ok, out) = probe_pair(&p, &d, &[]).await;
    assert!(!ok, "{out}");
    let l = line(&out, "FAIL", "decode leg").expect(&out);
    assert!(l.contains("KV pull from the prefill engine failed"), "{l}");
    assert!(l.contains("read refused"), "{l}");
    assert!(l.contains("HTTP 500"), "{l}");
}

#[tokio::test]
async fn unreachable_side_channel_is_named() {
    let (p, d) = tokio::join!(sim(&["--fault-side-channel-down"]), sim(&[]));
    let (ok, out) = probe_pair(&p, &d, &[]).await;
    assert!(!ok, "{out}");
    let l = line(&out, "FAIL", "handshake").expect(&out);
    assert!(l.contains("unreachable"), "{l}");
    assert!(l.contains("VLLM_NIXL_SIDE_CHANNEL_HOST"), "{l}");
}

#[tokio::test]
async fn a_decode_engine_that_recomputes_is_named() {
    let (p, d) = tokio::join!(sim(&[]), sim(&["--no-kv-connector"]));
    let (ok, out) = probe_pair(&p, &d, &[]).await;
    assert!(!ok, "{out}");
    let l = line(&out, "FAIL", "decode leg").expect(&out);
    assert!(
        l.contains("recomputed the prompt instead of pulling"),
        "{l}"
    );
}
