//! What the public port exposes: with `server.admin_listen` set, no `/metrics` or `/admin/*`
//! (which name engines, and other clients' request and trace ids); and a client can never hand
//! an engine KV params of its own choosing.

use std::time::Duration;

use serde_json::{json, Value};

use super::{
    assert_error, auth_table, completion, config, get_status, send, tandem, tenants, KeyFile, MODEL,
};
use crate::support::{read_sse, Sim, Tandem, PROMPT};

const ADMIN: [&str; 4] = [
    "/metrics",
    "/admin/requests",
    "/admin/requests/pinned",
    "/admin/engines",
];

/// Finding: `/admin/engines`, `/admin/requests` and `/metrics` answered anyone on the public
/// port. With `admin_listen` they answer 404 there and 200 on the admin listener only.
#[tokio::test]
async fn admin_routes_are_not_on_the_public_port_when_admin_listen_is_set() {
    let d = Sim::start(&[]).await;
    let t = tandem(&d, "").await;
    let (status, _) = t
        .post_json("/v1/completions", &completion(2), Some("r-1"))
        .await;
    assert_eq!(status, 200);
    for path in ADMIN {
        let resp = t.get(path).await;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_error(status, &v, 404, "NotFoundError");
    }
    let admin = t.admin();
    assert_ne!(admin.url, t.url);
    for path in ADMIN.iter().chain(&["/health", "/ready"]) {
        assert_eq!(admin.get(path).await.status(), 200, "{path}");
    }
    let recent: Value = admin.get("/admin/requests").await.json().await.unwrap();
    assert!(
        recent
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["request_id"] == "r-1"),
        "{recent}"
    );
    // The admin listener serves only the admin surface.
    assert_eq!(
        send(&admin, "/v1/completions", None, &completion(2))
            .await
            .status(),
        404
    );
}

/// Without `admin_listen` (the default) the admin routes stay on the public port, and behind the
/// key when `[auth]` is on.
#[tokio::test]
async fn without_an_admin_listener_admin_routes_need_the_key() {
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&[("ops", "")]));
    let t = Tandem::start(&config(&d, false, &auth_table(&keys))).await;
    assert!(t.ready.get("admin").is_none(), "{}", t.ready);
    for path in ADMIN {
        assert_eq!(get_status(&t, path, None).await, 401, "{path}");
        assert_eq!(get_status(&t, path, Some("sk-nope")).await, 401, "{path}");
        assert_eq!(get_status(&t, path, Some("sk-ops")).await, 200, "{path}");
    }
}

/// Finding: client-sent `kv_transfer_params` never reach an engine. A client plants a decode
/// leg's params pointing at a socket it listens on; through every generating endpoint, with and
/// without disaggregation, nothing ever connects there. (A decode engine given such params
/// connects to that side channel to pull the KV, as the control at the end shows.)
#[tokio::test]
async fn client_kv_transfer_params_never_reach_an_engine() {
    let p = Sim::start(&[]).await;
    let d = Sim::start(&[]).await;
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let port = trap.local_addr().unwrap().port();
    let chat = json!([{"role": "user", "content": PROMPT}]);
    let bodies = [
        ("/v1/completions", completion(3)),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": true}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [PROMPT, "a second prompt"], "max_tokens": 3}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": chat, "max_tokens": 3}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": chat, "max_tokens": 3, "stream": true}),
        ),
    ];
    // Params a decode engine would act on for this prompt: as many blocks as it has.
    let mut planted = Vec::new();
    for (_, body) in &bodies {
        let ask = match body.get("messages") {
            Some(m) => json!({"model": MODEL, "messages": m}),
            None => json!({"model": MODEL, "prompt": PROMPT}),
        };
        let (status, v) = d.post_json("/tokenize", &ask, None).await;
        assert_eq!(status, 200, "{v}");
        let blocks = v["tokens"].as_array().unwrap().len().div_ceil(16);
        let mut b = body.clone();
        b["kv_transfer_params"] = json!({
            "do_remote_prefill": true, "do_remote_decode": false,
            "remote_engine_id": "planted", "remote_request_id": "planted",
            "remote_block_ids": (0..blocks).collect::<Vec<_>>(),
            "remote_host": "127.0.0.1", "remote_port": port,
        });
        planted.push(b);
    }
    for mode in ["always", "never"] {
        let cfg = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [pools.prefill]\nendpoints = [\"{}\"]\n\n\
             [pools.decode]\nendpoints = [\"{}\"]\n\n\
             [disaggregation]\nmode = \"{mode}\"\n\n[health]\ninterval_ms = 100\n",
            p.url, d.url
        );
        let t = Tandem::start(&cfg).await;
        for ((path, _), body) in bodies.iter().zip(&planted) {
            let resp = send(&t, path, None, body).await;
            assert_eq!(resp.status(), 200, "{mode} {path} {body}");
            if body["stream"] == true {
                let sse = read_sse(resp).await;
                assert!(sse.done && !sse.cut, "{mode} {path}");
            } else {
                let v: Value = resp.json().await.unwrap();
                assert!(v["choices"].is_array(), "{v}");
            }
        }
        // Every answer is complete, so any pull has been tried: the kernel queued its
        // connection whether or not anyone accepted it.
        match trap.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{mode}: something connected to the planted side channel: {other:?}"),
        }
    }
    // The control: the same params sent to the engine directly are acted on.
    let direct = tokio::spawn({
        let (url, body) = (d.url.clone(), planted[0].clone());
        async move {
            let _ = reqwest::Client::new()
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await;
        }
    });
    let trap = tokio::net::TcpListener::from_std(trap).unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(30), trap.accept()).await;
    assert!(
        matches!(conn, Ok(Ok(_))),
        "the engine never pulled from the planted params when sent them directly"
    );
    direct.abort();
}
