//! Engines over TLS: a TLS-terminating proxy (tokio-rustls, a certificate for `localhost` from a
//! CA made at test time with rcgen) in front of a real `tandem sim`, reached by `tandem serve` at
//! `https://localhost:PORT`, over HTTP and over gRPC. With the CA in `tls.ca_file` requests are
//! served; with another CA the engine stays unhealthy and `/admin/engines` says why.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio_rustls::rustls;

use crate::support::{temp_dir, Sim, Tandem};

/// A CA, and a server certificate it signed for `localhost` and 127.0.0.1.
struct Pki {
    ca_pem: String,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("CA certificate");
    (cert, rcgen::Issuer::new(p, key))
}

fn pki() -> Pki {
    let (ca_cert, issuer) = ca("Tandem test CA");
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
        .expect("server params");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = p.signed_by(&key, &issuer).expect("server certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

/// Terminates TLS on a local port and forwards the plaintext to `upstream` (`host:port`); stops
/// accepting when dropped. `handshakes` counts completed TLS handshakes.
struct TlsProxy {
    port: u16,
    handshakes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsProxy {
    async fn start(pki: &Pki, upstream: &str) -> TlsProxy {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(pki.chain.clone(), pki.key.clone_key())
            .expect("server certificate and key");
        // gRPC clients need h2 by ALPN; Tandem's HTTP client asks for http/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let handshakes = Arc::new(AtomicU64::new(0));
        let count = handshakes.clone();
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream, count) =
                    (acceptor.clone(), upstream.clone(), count.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate gives up here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsProxy {
            port,
            handshakes,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

fn authority(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// `tandem serve` with one decode engine (`endpoint`, TOML) over `protocol`, everything local,
/// trusting only `ca_pem` (written to a file of its own).
async fn tandem(protocol: &str, endpoint: &str, ca_pem: &str) -> (Tandem, std::path::PathBuf) {
    let dir = temp_dir("tls");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("write the CA file");
    let conf = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\n\n\
         [pools.decode]\nprotocol = \"{protocol}\"\nendpoints = [{endpoint}]\n\n\
         [disaggregation]\nmode = \"never\"\n\n\
         [health]\ninterval_ms = 50\nscrape_interval_ms = 50\n\n\
         [tls]\nca_file = {:?}\nsystem_roots = false\n",
        ca.display().to_string()
    );
    (Tandem::spawn(&conf).await, dir)
}

/// Poll `/admin/engines` until the decode engine is `state`; returns it.
async fn decode_engine(t: &Tandem, state: &str) -> Value {
    let reached = t.wait_engines("decode", |e| e["state"] == state).await;
    let e = t.engines().await["engines"][0].clone();
    assert!(reached, "the engine never got {state}: {e}");
    e
}

async fn served_over_tls(t: &Tandem) {
    let body = json!({"prompt": "over TLS", "max_tokens": 5});
    let (status, v) = t.post_json("/v1/completions", &body, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
}

#[tokio::test]
async fn an_https_engine_is_reached_over_tls_with_the_configured_ca_only() {
    let sim = Sim::start(&[]).await;
    let pki = pki();
    let proxy = TlsProxy::start(&pki, authority(&sim.url)).await;
    let endpoint = format!("{:?}", proxy.url());

    let (t, dir) = tandem("http", &endpoint, &pki.ca_pem).await;
    let e = decode_engine(&t, "healthy").await;
    assert_eq!(e["url"], proxy.url());
    served_over_tls(&t).await;
    assert!(proxy.handshakes.load(Ordering::SeqCst) > 0);
    drop(t);
    let _ = std::fs::remove_dir_all(dir);

    // Trusting another CA only: the handshake fails, the engine is unhealthy, and says why.
    let (other, _) = ca("Some other CA");
    let before = proxy.handshakes.load(Ordering::SeqCst);
    let (t, dir) = tandem("http", &endpoint, &other.pem()).await;
    let e = decode_engine(&t, "unhealthy").await;
    let why = e["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("certificate"), "{e}");
    assert_eq!(t.ready().await.0, 503);
    assert_eq!(proxy.handshakes.load(Ordering::SeqCst), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_https_grpc_engine_is_reached_over_tls_with_the_configured_ca_only() {
    let sim = Sim::start(&["--grpc-port", "0"]).await;
    let grpc = sim.ready["grpc"].as_str().expect("the sim's gRPC address");
    let pki = pki();
    let (rpc, metrics) = tokio::join!(
        TlsProxy::start(&pki, grpc),
        TlsProxy::start(&pki, authority(&sim.url))
    );
    let endpoint = format!("{{ url = {:?}, metrics = {:?} }}", rpc.url(), metrics.url());

    let (t, dir) = tandem("grpc", &endpoint, &pki.ca_pem).await;
    decode_engine(&t, "healthy").await;
    served_over_tls(&t).await;
    assert!(rpc.handshakes.load(Ordering::SeqCst) > 0);
    // The KV load figures come from the engine's metrics port, over TLS too.
    let e = t.engines().await["engines"][0].clone();
    assert!(e["kv_total_blocks"].as_u64().is_some(), "{e}");
    assert!(metrics.handshakes.load(Ordering::SeqCst) > 0);
    drop(t);
    let _ = std::fs::remove_dir_all(dir);

    let (other, _) = ca("Some other CA");
    let (t, dir) = tandem("grpc", &endpoint, &other.pem()).await;
    let e = decode_engine(&t, "unhealthy").await;
    let why = e["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("certificate"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
