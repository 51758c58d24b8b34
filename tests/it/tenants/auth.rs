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
