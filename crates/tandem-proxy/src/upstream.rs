//! HTTP/1.1 client for one engine, with a pool of kept-alive connections that can be warmed
//! ahead of use.
//!
//! Tandem owns its connections instead of using a general-purpose client for two reasons:
//! the decode leg must fire the instant the prefill's KV params arrive, so a connection to the
//! chosen decode engine is made ready while the prefill runs; and aborting a leg must close its
//! TCP connection at once, because that is how a vLLM engine learns to abort the request and free
//! its KV blocks. A [`Conn`] dropped without [`Conn::release`] closes its socket.
//!
//! An `https://` engine's connections are TLS (`tls.rs`), set up within the connect timeout;
//! the HTTP/1.1 connection on top is the same either way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::tls::EngineTls;
use crate::trace::Outgoing;

/// Idle connections kept per engine; more than this are closed on release.
const MAX_IDLE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: hyper::Error },
    #[error("request to {addr} failed: {source}")]
    Send { addr: String, source: hyper::Error },
}

/// One engine's base address and its idle connections.
#[derive(Debug)]
pub struct Upstream {
    /// `host:port`, for TCP connect and the `Host` header.
    authority: String,
    connect_timeout: Duration,
    /// How an `https://` engine is reached (`None` for `http://`).
    tls: Option<Tls>,
    idle: Mutex<Vec<Idle>>,
}

/// An `https://` engine's connector and server name, or why there is none.
#[derive(Clone)]
enum Tls {
    Ready(TlsConnector, ServerName<'static>),
    Unusable(&'static str),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tls::Ready(_, name) => write!(f, "Tls({name:?})"),
            Tls::Unusable(why) => write!(f, "Tls(unusable: {why})"),
        }
    }
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

/// A connection checked out for one request.
#[derive(Debug)]
pub struct Conn {
    /// `None` only after `release`.
    inner: Option<Idle>,
    upstream: Arc<Upstream>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.inner.take() {
            c.task.abort();
        }
    }
}

impl Upstream {
    /// `base` is `http[s]://host:port` (validated by the config); `https://` is TLS from `tls`.
    pub fn new(base: &str, connect_timeout: Duration, tls: &EngineTls) -> Arc<Self> {
        let authority = base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let tls =
            base.starts_with("https://")
                .then(|| match tls.connector(crate::tls::host_of(base)) {
                    Some((c, name)) => Tls::Ready(c, name),
                    None => Tls::Unusable("no TLS client configuration for this host"),
                });
        Arc::new(Upstream {
            authority,
            connect_timeout,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A ready connection: an idle one if any is still open, else a new one.
    pub async fn acquire(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        loop {
            let idle = self.idle.lock().expect("idle pool lock").pop();
            let Some(mut c) = idle else { break };
            if c.sender.is_closed() || c.task.is_finished() {
                c.task.abort();
                continue;
            }
            if c.sender.ready().await.is_ok() {
                return Ok(Conn {
                    inner: Some(c),
                    upstream: self.clone(),
                });
            }
            c.task.abort();
        }
        self.connect().await
    }

    /// A new connection, never from the pool.
    pub async fn connect(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        let addr = self.authority.clone();
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(&addr)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr }),
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        // Tokens are small writes; Nagle would hold them back.
        let _ = stream.set_nodelay(true);
        let sender = match &self.tls {
            None => handshake(TokioIo::new(stream), &addr).await?,
            Some(Tls::Unusable(why)) => {
                return Err(UpstreamError::Tls {
                    addr,
                    source: std::io::Error::other(*why),
                })
            }
            Some(Tls::Ready(connector, name)) => {
                let tls = connector.connect(name.clone(), stream);
                let stream = match tokio::time::timeout_at(deadline, tls).await {
                    Err(_) => return Err(UpstreamError::ConnectTimeout { addr }),
                    Ok(Err(source)) => return Err(UpstreamError::Tls { addr, source }),
                    Ok(Ok(s)) => s,
                };
                handshake(TokioIo::new(stream), &addr).await?
            }
        };
        Ok(Conn {
            inner: Some(sender),
            upstream: self.clone(),
        })
    }

    /// Close every idle connection (an engine left the pool).
    pub fn close_idle(&self) {
        for c in self.idle.lock().expect("idle pool lock").drain(..) {
            c.task.abort();
        }
    }
}

/// HTTP/1.1 over `io`, its connection driven by a task of its own.
async fn handshake<T>(io: T, addr: &str) -> Result<Idle, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|source| UpstreamError::Handshake {
            addr: addr.to_string(),
            source,
        })?;
    let task = tokio::spawn(async move {
        // Errors here surface to the request through `send`; the task only drives IO.
        let _ = conn.await;
    });
    Ok(Idle { sender, task })
}

impl Conn {
    /// Build a POST with a JSON body for this engine.
    /// Every leg carries the request id and the trace context (Tandem's span as the parent).
    pub fn post_json(
        &self,
        path: &str,
        body: Bytes,
        request_id: &str,
        trace: &Outgoing,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::post(path)
            .header(hyper::header::HOST, self.upstream.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id)
            .header("traceparent", trace.traceparent.clone());
        if let Some(ts) = &trace.tracestate {
            b = b.header("tracestate", ts.clone());
        }
        if let Some(h) = b.headers_mut() {
            h.insert(
                hyper::header::CONTENT_LENGTH,
                hyper::header::HeaderValue::from(body.len()),
            );
        }
        b.body(Full::new(body))
            .expect("static method, path from the router and validated headers")
    }

    /// Build a GET for this engine.
    pub fn get(&self, path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header(hyper::header::HOST, self.upstream.authority.as_str())
            .body(Full::new(Bytes::new()))
            .expect("static method and path")
    }

    /// Send a request. A connection the engine closed while it sat idle (in the pool, or warmed
    /// while a prefill ran; uvicorn's keep-alive timeout is 5 s) fails before the request is
    /// written; the request then goes out once more on a fresh connection. A request that may
    /// have reached the engine is never sent twice.
    pub async fn send(
        &mut self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut resent = false;
        loop {
            let sender = &mut self
                .inner
                .as_mut()
                .expect("a checked-out connection holds its sender until released")
                .sender;
            match sender.try_send_request(req).await {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !resent => {
                        *self = self.upstream.connect().await?;
                        req = unsent;
                        resent = true;
                    }
                    _ => {
                        return Err(UpstreamError::Send {
                            addr: self.upstream.authority.clone(),
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
    }

    /// Return a connection whose last response was read to the end to the idle pool.
    pub fn release(mut self) {
        let Some(c) = self.inner.take() else { return };
        if c.sender.is_closed() || c.task.is_finished() {
            c.task.abort();
            return;
        }
        let mut idle = self.upstream.idle.lock().expect("idle pool lock");
        if idle.len() >= MAX_IDLE {
            c.task.abort();
            return;
        }
        idle.push(c);
    }
}
