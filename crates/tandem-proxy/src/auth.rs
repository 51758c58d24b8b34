//! API keys: which tenant a request is, from `Authorization: Bearer <key>`.
//!
//! Keys come from `[auth] keys_file` (re-read every `reload_interval_ms`, swapped in when its
//! contents change and parse) and the variable `[auth] keys_env` names (read once at start-up).
//! Only SHA-256 digests are kept; a presented key is hashed and compared with every stored
//! digest in constant time, so neither the comparison nor the scan order tells an attacker how
//! close a guess came. No key, digest or key-file line is ever logged or put in an answer.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tandem_config::keys::KeySecret;
use tandem_config::{AuthConfig, KeyFile, KeyFileError, Tenant};

use crate::error::ProxyError;
use crate::metrics::{Metrics, ReasonLabels, ResultLabels};
use crate::State;

/// The authenticated caller, put in the request's extensions by [`require`].
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Arc<Tenant>);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.keys_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("auth.keys_file {path}: {source}")]
    File { path: PathBuf, source: KeyFileError },
    #[error("auth.keys_env: the environment variable {0} is not set")]
    EnvUnset(String),
    #[error("auth.keys_env {var}: {source}")]
    Env { var: String, source: KeyFileError },
    #[error("keys[{0}] and keys[{1}] are the same key")]
    Duplicate(usize, usize),
}

/// Why a request was refused; each is a `reason` label of `tandem_auth_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Missing,
    Malformed,
    Unknown,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Unknown => "unknown_key",
        }
    }

    /// What the client reads (OpenAI's wording where it has one); never the key it sent.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "You didn't provide an API key. Provide it in an Authorization header using \
                 Bearer auth (Authorization: Bearer YOUR_KEY)."
            }
            Refusal::Malformed => "The Authorization header must be `Bearer <API key>`.",
            Refusal::Unknown => "Incorrect API key provided.",
        }
    }
}

/// The keys in force: each digest with its tenant.
#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<([u8; 32], Arc<Tenant>)>,
    tenants: usize,
}

impl KeySet {
    fn build(file: KeyFile) -> Result<KeySet, AuthError> {
        let tenants: Vec<Arc<Tenant>> = file.tenants.into_iter().map(Arc::new).collect();
        let mut keys: Vec<([u8; 32], Arc<Tenant>)> = Vec::with_capacity(file.keys.len());
        for (i, k) in file.keys.into_iter().enumerate() {
            let digest = match k.secret {
                KeySecret::Plain(key) => sha256(key.as_bytes()),
                KeySecret::Sha256(d) => d,
            };
            // One key for two tenants would be ambiguous, and for one tenant a typo.
            if let Some(j) = keys.iter().position(|(d, _)| *d == digest) {
                return Err(AuthError::Duplicate(j, i));
            }
            keys.push((digest, tenants[k.tenant].clone()));
        }
        Ok(KeySet {
            keys,
            tenants: tenants.len(),
        })
    }

    fn find(&self, digest: &[u8; 32]) -> Option<Arc<Tenant>> {
        let mut found = None;
        // Every entry is compared, whatever matched before.
        for (d, t) in &self.keys {
            if ct_eq(d, digest) && found.is_none() {
                found = Some(t.clone());
            }
        }
        found
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equality that reads every byte of both, whatever differs first.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The key sets and where they come from.
#[derive(Debug)]
pub(crate) struct Auth {
    keys: RwLock<Arc<KeySet>>,
    /// The key variable's document, merged into every reload of the file.
    env: KeyFile,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// `None` when `[auth]` names no key source. Reads the sources now (an unreadable or invalid
    /// one fails start-up) and starts the file's reload task.
    pub fn start(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Option<Arc<Auth>>, AuthError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let env = match &cfg.keys_env {
            Some(var) => {
                let text = std::env::var(var).map_err(|_| AuthError::EnvUnset(var.clone()))?;
                tandem_config::parse_keys(&text).map_err(|source| AuthError::Env {
                    var: var.clone(),
                    source,
                })?
            }
            None => KeyFile::default(),
        };
        let (set, digest) = match &cfg.keys_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|source| AuthError::Read {
                    path: path.clone(),
                    source,
                })?;
                (load(path, &text, &env)?, Some(sha256(&text)))
            }
            None => (KeySet::build(env.clone())?, None),
        };
        metrics.access.auth_keys.set(set.keys.len() as i64);
        tracing::info!(
            tenants = set.tenants,
            keys = set.keys.len(),
            "API keys loaded"
        );
        let auth = Arc::new(Auth {
            keys: RwLock::new(Arc::new(set)),
            env,
            metrics,
        });
        if let (Some(path), Some(digest)) = (&cfg.keys_file, digest) {
            let every = Duration::from_millis(cfg.reload_interval_ms);
            tokio::spawn(reload(Arc::downgrade(&auth), path.clone(), digest, every));
        }
        Ok(Some(auth))
    }

    /// The tenant whose key `headers` carry.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Tenant>, Refusal> {
        let value = headers.get(header::AUTHORIZATION).ok_or(Refusal::Missing)?;
        let value = value.to_str().map_err(|_| Refusal::Malformed)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(Refusal::Malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(Refusal::Malformed);
        }
        let set = self.keys.read().expect("auth keys lock").clone();
        set.find(&sha256(token.as_bytes())).ok_or(Refusal::Unknown)
    }

    fn swap(&self, set: KeySet) {
        self.metrics.access.auth_keys.set(set.keys.len() as i64);
        *self.keys.write().expect("auth keys lock") = Arc::new(set);
    }

    fn count_reload(&self, result: &'static str) {
        if self.metrics.enabled() {
            self.metrics
                .access
                .auth_reloads
                .get_or_create(&ResultLabels { result })
                .inc();
        }
    }
}

fn load(path: &std::path::Path, text: &[u8], env: &KeyFile) -> Result<KeySet, AuthError> {
    let file = |source| AuthError::File {
        path: path.to_path_buf(),
        source,
    };
    let doc = std::str::from_utf8(text).map_err(|_| {
        file(KeyFileError::Syntax {
            line: None,
            message: "not UTF-8".into(),
        })
    })?;
    let parsed = tandem_config::parse_keys(doc).map_err(file)?;
    KeySet::build(parsed.merge(env.clone()).map_err(file)?)
}

/// Re-read the key file every `every`; swap in a changed one that parses. A file that fails
/// keeps the keys in force (a Secret being rewritten may be briefly absent or half-written), and
/// is logged once per distinct content.
async fn reload(auth: Weak<Auth>, path: PathBuf, mut last: [u8; 32], every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut unreadable = false;
    loop {
        tick.tick().await;
        let Some(auth) = auth.upgrade() else { return };
        let text = match tokio::fs::read(&path).await {
            Ok(t) => t,
            Err(e) => {
                if !unreadable {
                    tracing::warn!(path = %path.display(), error = %e, "the API key file cannot be read; the keys loaded before stay in force");
                    auth.count_reload("error");
                }
                unreadable = true;
                continue;
            }
        };
        unreadable = false;
        let digest = sha256(&text);
        if digest == last {
            continue;
        }
        last = digest;
        match load(&path, &text, &auth.env) {
            Ok(set) => {
                tracing::info!(
                    tenants = set.tenants,
                    keys = set.keys.len(),
                    "API keys reloaded"
                );
                auth.swap(set);
                auth.count_reload("ok");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed API key file is invalid; the keys loaded before stay in force");
                auth.count_reload("error");
            }
        }
    }
}

/// The front door's check on every protected route: no valid key, 401; else the caller goes in
/// the request's extensions.
pub(crate) async fn require(
    AxState(st): AxState<Arc<State>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(auth) = &st.auth else {
        return next.run(req).await;
    };
    match auth.authenticate(req.headers()) {
        Ok(tenant) => {
            req.extensions_mut().insert(Caller(tenant));
            next.run(req).await
        }
        Err(refusal) => {
            if st.metrics.enabled() {
                st.metrics
                    .access
                    .auth_rejected
                    .get_or_create(&ReasonLabels {
                        reason: refusal.as_str(),
                    })
                    .inc();
            }
            tracing::debug!(
                reason = refusal.as_str(),
                path = req.uri().path(),
                "request refused: no valid API key"
            );
            ProxyError::Unauthorized(refusal.message()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn set(doc: &str) -> KeySet {
        KeySet::build(tandem_config::parse_keys(doc).unwrap()).unwrap()
    }

    fn auth(doc: &str) -> Auth {
        Auth {
            keys: RwLock::new(Arc::new(set(doc))),
            env: KeyFile::default(),
            metrics: Arc::new(Metrics::new(None, true)),
        }
    }

    fn with(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(value).unwrap(),
        );
        h
    }

    #[test]
    fn a_bearer_key_names_its_tenant_and_anything_else_is_refused() {
        // The second key by its digest, as an operator keeping keys out of the file writes it.
        let digest: String = sha256(b"sk-b").iter().map(|b| format!("{b:02x}")).collect();
        let doc = format!(
            "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"b\"\n\
             [[keys]]\nkey = \"sk-a\"\ntenant = \"a\"\n\
             [[keys]]\nkey_sha256 = \"{digest}\"\ntenant = \"b\"\n"
        );
        let a = auth(&doc);
        assert_eq!(a.authenticate(&with(b"Bearer sk-a")).unwrap().name, "a");
        assert_eq!(a.authenticate(&with(b"bearer  sk-b ")).unwrap().name, "b");
        assert_eq!(
            a.authenticate(&HeaderMap::new()).unwrap_err(),
            Refusal::Missing
        );
        for bad in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer",
            b"Bearer ",
            b"sk-a",
            b"\xff\xfe",
        ] {
            assert_eq!(
                a.authenticate(&with(bad)).unwrap_err(),
                Refusal::Malformed,
                "{bad:?}"
            );
        }
        for wrong in [&b"Bearer sk-c"[..], b"Bearer sk-a2", b"Bearer SK-A"] {
            assert_eq!(a.authenticate(&with(wrong)).unwrap_err(), Refusal::Unknown);
        }
    }

    #[test]
    fn the_same_key_twice_is_refused_without_naming_it() {
        let doc = "[[tenants]]\nname = \"a\"\n[[keys]]\nkey = \"sk-a\"\ntenant = \"a\"\n\
                   [[keys]]\nkey = \"sk-a\"\ntenant = \"a\"\n";
        let e = KeySet::build(tandem_config::parse_keys(doc).unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "keys[0] and keys[1] are the same key");
    }

    #[test]
    fn constant_time_equality_is_equality() {
        let (a, b) = (sha256(b"x"), sha256(b"y"));
        assert!(ct_eq(&a, &a));
        assert!(!ct_eq(&a, &b));
        let mut c = a;
        c[31] ^= 1;
        assert!(!ct_eq(&a, &c));
    }

    #[tokio::test]
    async fn a_rewritten_key_file_is_swapped_in_and_a_broken_one_keeps_the_old_keys() {
        let dir = std::env::temp_dir().join(format!("tandem-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(
            &path,
            "[[tenants]]\nname = \"a\"\n[[keys]]\nkey = \"old\"\ntenant = \"a\"\n",
        )
        .unwrap();
        let cfg = AuthConfig {
            keys_file: Some(path.clone()),
            keys_env: None,
            reload_interval_ms: 10,
        };
        let metrics = Arc::new(Metrics::new(None, true));
        let a = Auth::start(&cfg, metrics).unwrap().unwrap();
        assert!(a.authenticate(&with(b"Bearer old")).is_ok());
        std::fs::write(
            &path,
            "[[tenants]]\nname = \"a\"\n[[keys]]\nkey = \"new\"\ntenant = \"a\"\n",
        )
        .unwrap();
        let mut swapped = false;
        for _ in 0..500 {
            if a.authenticate(&with(b"Bearer new")).is_ok() {
                swapped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(swapped, "the new key was never accepted");
        assert_eq!(
            a.authenticate(&with(b"Bearer old")).unwrap_err(),
            Refusal::Unknown
        );
        std::fs::write(&path, "[[keys]]\nkey = ").unwrap();
        let errors = || {
            a.metrics
                .access
                .auth_reloads
                .get_or_create(&ResultLabels { result: "error" })
                .get()
        };
        for _ in 0..500 {
            if errors() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(errors(), 1);
        assert!(a.authenticate(&with(b"Bearer new")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
