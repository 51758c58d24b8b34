//! Canary and traffic splits through the real binary: a 5 % canary group gets exactly 5 % of
//! the split's requests, `x-tandem-group` and a tenant's pinned group send a request there, and
//! no request's prefill and decode engines are ever in different groups.

use std::collections::HashMap;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::support::{Peer, Sim, Tandem, PROMPT};

const MODEL: &str = "Qwen/Qwen3-0.6B";

/// POST a one-token completion with `key` and optional headers; (status, request id).
async fn send(t: &Peer, key: &str, id: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "ignore_eos": true});
    let mut req = t
        .client
        .post(format!("{}/v1/completions", t.url))
        .bearer_auth(key)
        .header("x-request-id", id)
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn a_five_percent_canary_gets_five_percent_and_pairs_stay_in_their_group() {
    let (p0, p1, d0, d1) = tokio::join!(
        Sim::start(&["--seed", "3"]),
        Sim::start(&["--seed", "3"]),
        Sim::start(&["--seed", "3"]),
        Sim::start(&["--seed", "3"]),
    );
    let group_of: HashMap<String, &str> = [
        (p0.url.clone(), "default"),
        (d0.url.clone(), "default"),
        (p1.url.clone(), "canary"),
        (d1.url.clone(), "canary"),
    ]
    .into();
    let dir = crate::support::temp_dir("splits");
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[tenants]]\nname = \"open\"\n\n[[tenants]]\nname = \"pinned\"\ngroup = \"canary\"\n\n\
         [[keys]]\nkey = \"sk-open\"\ntenant = \"open\"\n\n\
         [[keys]]\nkey = \"sk-pinned\"\ntenant = \"pinned\"\n",
    )
    .unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrecent_requests = 4096\n\n\
         [auth]\nkeys_file = \"{}\"\n\n\
         [pools]\ngroups = {{ default = 95, canary = 5 }}\n\n\
         [pools.prefill]\nendpoints = [\"{}\", {{ url = \"{}\", group = \"canary\" }}]\n\
         policy = \"least-loaded\"\n\n\
         [pools.decode]\nendpoints = [\"{}\", {{ url = \"{}\", group = \"canary\" }}]\n\
         policy = \"least-loaded\"\n\n\
         [disaggregation]\nmode = \"always\"\n\n[health]\ninterval_ms = 100\n",
        keys.display(),
        p0.url,
        p1.url,
        d0.url,
        d1.url
    );
    let t = Tandem::start(&config).await;
    let admin = t.admin();
    // Every engine healthy before the split is judged (no fallback muddies the share).
    let mut engines = Value::Null;
    for _ in 0..400 {
        engines = admin.get("/admin/engines").await.json().await.unwrap();
        let list = engines["engines"].as_array().unwrap();
        if list.len() == 4 && list.iter().all(|e| e["state"] == "healthy") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    for e in engines["engines"].as_array().unwrap() {
        let url = e["url"].as_str().unwrap();
        assert_eq!(e["group"], group_of[url], "{e}");
    }

    // 400 split requests, 16 at a time: exactly 20 (5 %) go to the canary.
    const N: usize = 400;
    let peer: &Peer = &t;
    let statuses: Vec<u16> = futures::stream::iter(0..N)
        .map(|i| async move { send(peer, "sk-open", &format!("split-{i}"), &[]).await.0 })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    // A header match, a tenant's pinned group, and the header over the pin.
    let (s, _) = send(&t, "sk-open", "by-header", &[("x-tandem-group", "canary")]).await;
    assert_eq!(s, 200);
    let (s, _) = send(&t, "sk-pinned", "by-tenant", &[]).await;
    assert_eq!(s, 200);
    let (s, _) = send(
        &t,
        "sk-pinned",
        "header-over-pin",
        &[("x-tandem-group", "default")],
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = send(&t, "sk-open", "unknown", &[("x-tandem-group", "blue")]).await;
    assert_eq!(s, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("x-tandem-group") && msg.contains("canary"),
        "{msg}"
    );
    assert!(!msg.contains("http://"), "{msg}");

    let records: Vec<Value> = admin.get("/admin/requests").await.json().await.unwrap();
    let by_id: HashMap<&str, &Value> = records
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap(), r))
        .collect();
    let mut canary = 0;
    for i in 0..N {
        let r = by_id[format!("split-{i}").as_str()];
        assert_eq!(r["outcome"], "ok", "{r}");
        let g = r["group"].as_str().unwrap();
        // Both legs ran, both in the request's group.
        let p = r["prefill_engine"].as_str().expect("a prefill leg");
        let d = r["decode_engine"].as_str().expect("a decode leg");
        assert_eq!(group_of[p], g, "{r}");
        assert_eq!(group_of[d], g, "{r}");
        canary += usize::from(g == "canary");
    }
    assert_eq!(canary, N / 20, "the canary's share of {N} split requests");
    for (id, want) in [
        ("by-header", "canary"),
        ("by-tenant", "canary"),
        ("header-over-pin", "default"),
    ] {
        let r = by_id[id];
        assert_eq!(r["group"], want, "{r}");
        assert_eq!(group_of[r["prefill_engine"].as_str().unwrap()], want, "{r}");
        assert_eq!(group_of[r["decode_engine"].as_str().unwrap()], want, "{r}");
    }
    assert_eq!(by_id["unknown"]["group"], Value::Null);

    // Per-group metrics judge the canary.
    let m = admin.metrics().await;
    let metric = |name: &str, labels: &[(&str, &str)]| crate::support::metric_in(&m, name, labels);
    let selected = "tandem_group_selected_total";
    assert_eq!(
        metric(selected, &[("group", "canary"), ("reason", "split")]),
        20.0
    );
    assert_eq!(
        metric(selected, &[("group", "default"), ("reason", "split")]),
        380.0
    );
    assert_eq!(
        metric(selected, &[("group", "canary"), ("reason", "header")]),
        1.0
    );
    assert_eq!(
        metric(selected, &[("group", "default"), ("reason", "header")]),
        1.0
    );
    assert_eq!(
        metric(selected, &[("group", "canary"), ("reason", "tenant")]),
        1.0
    );
    assert_eq!(metric(selected, &[("reason", "fallback")]), 0.0);
    let ok = |g| metric("tandem_requests_total", &[("group", g), ("outcome", "ok")]);
    assert_eq!(ok("canary"), 22.0);
    assert_eq!(ok("default"), 381.0);
    assert_eq!(
        metric("tandem_ttft_seconds_count", &[("group", "canary")]),
        22.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_group_with_no_healthy_engine_falls_back_to_default() {
    let (p0, d0) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let down = crate::support::closed_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools]\ngroups = {{ default = 1, canary = 1 }}\n\n\
         [pools.prefill]\nendpoints = [\"{}\", {{ url = \"http://127.0.0.1:{down}\", group = \"canary\" }}]\n\n\
         [pools.decode]\nendpoints = [\"{}\", {{ url = \"http://127.0.0.1:{down}\", group = \"canary\" }}]\n\n\
         [disaggregation]\nmode = \"always\"\n\n[health]\ninterval_ms = 100\n",
        p0.url, d0.url
    );
    let t = Tandem::start(&config).await;
    for i in 0..4 {
        let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 1});
        let (s, v) = t
            .post_json("/v1/completions", &body, Some(&format!("fb-{i}")))
            .await;
        assert_eq!(s, 200, "{v}");
        let r = t.record(&format!("fb-{i}")).await;
        assert_eq!(r["group"], "default", "{r}");
    }
    let fallback = t
        .metric(
            "tandem_group_selected_total",
            &[("group", "default"), ("reason", "fallback")],
        )
        .await;
    assert_eq!(fallback, 2.0, "half the split asked for the canary");
}

/// Acceptance 4 at its own scale: of 10,000 cheap requests (one token, 32 at a time) through a
/// colocated pool with a 5 % canary group, 5 % ± 1 % land on the canary engine, counted by the
/// engines themselves and matched by Tandem's per-group counters; a header match then sends one
/// request there. `TANDEM_CANARY_REQUESTS` may lower the count for a quick local run.
#[tokio::test]
async fn a_five_percent_canary_gets_five_percent_of_ten_thousand_requests() {
    let n: usize = std::env::var("TANDEM_CANARY_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (stable, canary) = tokio::join!(Sim::start(&["--seed", "5"]), Sim::start(&["--seed", "6"]));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools]\ngroups = {{ default = 95, canary = 5 }}\n\n\
         [pools.prefill]\nendpoints = []\n\n\
         [pools.decode]\nendpoints = [\"{}\", {{ url = \"{}\", group = \"canary\" }}]\n\n\
         [disaggregation]\nmode = \"never\"\n\n[health]\ninterval_ms = 100\n",
        stable.url, canary.url
    );
    let t = Tandem::start(&config).await;
    assert!(
        t.wait_engines("decode", |e| e["state"] == "healthy").await,
        "{}",
        t.engines().await
    );
    let served = |s: &Sim| {
        let url = s.url.clone();
        let client = s.client.clone();
        async move {
            let text = client
                .get(format!("{url}/metrics"))
                .send()
                .await
                .expect("sim metrics")
                .text()
                .await
                .expect("metrics text");
            crate::support::metric_in(&text, "vllm:request_success_total", &[])
        }
    };
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 1});
    let started = std::time::Instant::now();
    let peer: &Peer = &t;
    let body = &body;
    let failed: Vec<(usize, u16)> = futures::stream::iter(0..n)
        .map(|i| async move {
            let resp = peer
                .client
                .post(format!("{}/v1/completions", peer.url))
                .json(body)
                .send()
                .await
                .expect("request sent");
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            (i, status)
        })
        .buffer_unordered(32)
        .filter(|(_, s)| futures::future::ready(*s != 200))
        .collect()
        .await;
    let elapsed = started.elapsed();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    let (on_canary, on_stable) = (served(&canary).await, served(&stable).await);
    eprintln!(
        "canary: {on_canary} of {n} requests ({:.2} %) in {:.1} s ({:.0} req/s)",
        100.0 * on_canary / n as f64,
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(on_canary + on_stable, n as f64, "every request served once");
    let (lo, hi) = (0.04 * n as f64, 0.06 * n as f64);
    assert!(
        (lo..=hi).contains(&on_canary),
        "the canary served {on_canary} of {n}, outside 5 % ± 1 %"
    );
    let m = t.metrics().await;
    let metric = |name: &str, labels: &[(&str, &str)]| crate::support::metric_in(&m, name, labels);
    let selected = "tandem_group_selected_total";
    assert_eq!(
        metric(selected, &[("group", "canary"), ("reason", "split")]),
        on_canary
    );
    assert_eq!(
        metric(selected, &[("group", "default"), ("reason", "split")]),
        on_stable
    );
    assert_eq!(metric(selected, &[("reason", "fallback")]), 0.0);
    let ok = |g| metric("tandem_requests_total", &[("group", g), ("outcome", "ok")]);
    assert_eq!((ok("canary"), ok("default")), (on_canary, on_stable));

    // A header match goes to the canary whatever the split would have chosen.
    for i in 0..3 {
        let (s, v) = send(
            &t,
            "",
            &format!("header-{i}"),
            &[("x-tandem-group", "canary")],
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(served(&canary).await, on_canary + 3.0);
    assert_eq!(served(&stable).await, on_stable);
}
