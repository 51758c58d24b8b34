//! `tandem bench trace` end to end: the real binary starts its own sims and coordinator.

use serde_json::Value;

use crate::support::temp_dir;

async fn bench_trace(args: &[&str]) -> Value {
    let json = temp_dir("bench-trace").join("trace.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "trace"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .expect("run tandem bench trace");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

/// `--prefill 0` replays colocated engines (`tandem plan`'s baseline): every request is served
/// whole by the decode pool, routed by the compared policy, and the engines' cached tokens come
/// back in the streamed usage, so the built-in chat's shared system prompts show as hits.
#[tokio::test]
async fn a_colocated_replay_serves_every_request_on_the_one_pool_and_sees_its_hits() {
    let v = bench_trace(&[
        "--format",
        "chat",
        "--requests",
        "24",
        "--prefill",
        "0",
        "--decode",
        "2",
        "--compare",
        "prefix,least-loaded",
        "--time-scale",
        "50",
    ])
    .await;
    assert_eq!(v["prefill_engines"], 0, "{v}");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{v}");
    for r in runs {
        let s = &r["summary"];
        assert_eq!(s["ok"], 24, "{}: {s}", r["policy"]);
        assert!(
            s["prefix_hit_rate"].as_f64().unwrap() > 0.0,
            "{}: {s}",
            r["policy"]
        );
        let engines = s["decode_load"]["per_engine"]
            .as_object()
            .expect("decode load");
        assert_eq!(engines.len(), 2, "{s}");
    }
    // A `PREFILL:DECODE` pair names two pools, and colocated there is one.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "trace", "--format", "chat", "--requests", "2"])
        .args(["--prefill", "0", "--compare", "prefix:kv-capacity"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("one pool with one policy"), "{err}");
}
