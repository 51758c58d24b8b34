//! TLS to `https://` engines (`[tls]`), with rustls: one client configuration for the process,
//! trusting the system's store and/or `tls.ca_file`. The URL's host is both the SNI name and the
//! name the engine's certificate must carry. `http://` engines stay plain TCP.
//!
//! Built at start-up only when some engine URL is `https://` (static, discovered or a gRPC
//! engine's metrics URL), so an unreadable CA file fails `tandem serve` at once with its path,
//! never a request later.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor};
use rustls::{ClientConfig, RootCertStore};
use tandem_config::Config;
use tokio_rustls::TlsConnector;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read tls.ca_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tls.ca_file {path} holds no usable PEM certificate{detail}")]
    NoCertificate { path: String, detail: String },
    #[error(
        "no CA to verify https:// engines with: the system certificate store is empty or \
         unreadable and tls.ca_file is not set"
    )]
    NoRoots,
}

/// What `https://` engines are verified against; cheap to clone.
#[derive(Clone, Default)]
pub struct EngineTls {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    config: Arc<ClientConfig>,
    /// The same roots, for tonic's own TLS configuration.
    anchors: Vec<TrustAnchor<'static>>,
}

impl std::fmt::Debug for EngineTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineTls")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// Whether any engine URL in the configuration is `https://`.
fn any_https(cfg: &Config) -> bool {
    [&cfg.pools.prefill, &cfg.pools.decode].iter().any(|p| {
        p.endpoints.iter().any(|e| {
            e.url.starts_with("https://")
                || e.metrics
                    .as_deref()
                    .is_some_and(|m| m.starts_with("https://"))
        }) || p.dns.as_ref().is_some_and(|d| d.scheme == "https")
    })
}

impl EngineTls {
    /// No TLS: for configurations (and tests) without `https://` engines.
    pub fn none() -> Self {
        EngineTls::default()
    }

    /// The process's TLS client configuration, if any engine needs one.
    pub fn load(cfg: &Config) -> Result<Self, TlsError> {
        if !any_https(cfg) {
            return Ok(EngineTls::none());
        }
        let t = &cfg.tls;
        let mut roots = RootCertStore::empty();
        if t.system_roots {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system certificate store");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates");
        }
        if let Some(path) = &t.ca_file {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                path: shown.clone(),
                source,
            })?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::NoCertificate {
                    path: shown.clone(),
                    detail: format!(": {e}"),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::NoCertificate {
                    path: shown,
                    detail: String::new(),
                });
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let anchors = roots.roots.clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Tandem's own HTTP client speaks HTTP/1.1 only (gRPC has its own configuration).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(EngineTls {
            inner: Some(Arc::new(Inner {
                config: Arc::new(config),
                anchors,
            })),
        })
    }

    /// The connector and server name for an `https://` engine whose URL's host is `host`;
    /// `None` when TLS was not configured or `host` is not a valid server name.
    pub fn connector(&self, host: &str) -> Option<(TlsConnector, ServerName<'static>)> {
        let inner = self.inner.as_ref()?;
        let name = ServerName::try_from(unbracket(host).to_string()).ok()?;
        Some((TlsConnector::from(inner.config.clone()), name))
    }

    /// tonic's TLS configuration for a gRPC engine at `host`: the same trust, with HTTP/2.
    pub fn grpc(&self, host: &str) -> Option<tonic::transport::ClientTlsConfig> {
        let inner = self.inner.as_ref()?;
        Some(
            tonic::transport::ClientTlsConfig::new()
                .domain_name(unbracket(host))
                .trust_anchors(inner.anchors.clone()),
        )
    }
}

/// An IPv6 literal as a server name: without the URL's brackets.
fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The host of `scheme://host:port[/]`, for SNI.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        // `[::1]:8000` splits at the port; a bare `[::1]` has no port after its bracket.
        Some((h, p)) if !p.contains(']') => h,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_server_name() {
        assert_eq!(host_of("https://engine.ns.svc:8443"), "engine.ns.svc");
        assert_eq!(host_of("https://10.0.0.5:8443/"), "10.0.0.5");
        assert_eq!(host_of("https://[fd00::1]:8443"), "[fd00::1]");
        assert_eq!(unbracket(host_of("https://[fd00::1]:8443")), "fd00::1");
    }

    fn config(extra: &str, decode: &str) -> Config {
        tandem_config::from_toml_str(&format!(
            "{extra}\n[pools.prefill]\nendpoints = [\"http://127.0.0.1:1\"]\n\
             [pools.decode]\nendpoints = [\"{decode}\"]\n"
        ))
        .unwrap()
    }

    #[test]
    fn only_https_engines_load_tls_and_a_bad_ca_file_is_named() {
        let none = EngineTls::load(&config("", "http://127.0.0.1:2")).unwrap();
        assert!(none.connector("127.0.0.1").is_none());

        let missing = config(
            "[tls]\nca_file = \"/nonexistent/ca.pem\"\n",
            "https://127.0.0.1:2",
        );
        let e = EngineTls::load(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");

        let dir = std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let cfg = config(
            &format!(
                "[tls]\nca_file = \"{}\"\nsystem_roots = false\n",
                junk.display()
            ),
            "https://engine:2",
        );
        let e = EngineTls::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("no usable PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
